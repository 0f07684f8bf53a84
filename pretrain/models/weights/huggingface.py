"""Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` keys -> the DINOv2 hub layout.

Hugging Face keeps separate query/key/value projections (concatenated here into `attn.qkv`)
and calls LayerScale `lambda1`. Saved checkpoints use the long-standing names
(`attention.attention.query`, `mlp.weights_in/weights_out`); transformers >= 5 names its
modules `attention.q_proj/…/o_proj` and `mlp.gate_proj/up_proj/down_proj` in memory, which is
what a `torch.save(model.state_dict())` holds. Both are accepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from lvd.pretrain.models.weights.hf_common import concat_groups, rename, strip_hf_prefixes
from lvd.pretrain.models.weights.strict import WeightsError

_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm(\d)\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc(\d)\.", r"blocks.\1.mlp.fc\2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
    (r"^encoder\.layer\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.w3."),
    (r"^layernorm\.", "norm."),
)
# saved checkpoints use attention.attention.{query,key,value}; transformers >= 5 modules are
# named attention.{q,k,v}_proj in memory (a state_dict() saved with torch.save has those)
_QKV = re.compile(
    r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$"
)
_QKV_PART = {"query": "query", "key": "key", "value": "value", "q_proj": "query", "k_proj": "key", "v_proj": "value"}
_GATE_UP = re.compile(r"^encoder\.layer\.(\d+)\.mlp\.(gate_proj|up_proj)\.(weight|bias)$")


def is_dinov2_layout(keys) -> bool:
    return any(re.match(r"^encoder\.layer\.\d+\.norm1\.", k) for k in keys)


def hf_to_hub(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and fuse; keys that match nothing are kept so that strict loading names them."""
    state_dict = strip_hf_prefixes(state_dict)
    out: dict[str, torch.Tensor] = {}
    qkv: dict = {}
    gate_up: dict = {}
    for key, tensor in state_dict.items():
        if m := _QKV.match(key):
            qkv.setdefault((m[1], m[3]), {})[_QKV_PART[m[2]]] = (key, tensor)
            continue
        if m := _GATE_UP.match(key):
            gate_up.setdefault((m[1], m[3]), {})[m[2]] = (key, tensor)
            continue
        out[rename(key, _RENAMES)] = tensor
    leftovers: dict = {}
    concat_groups(qkv, ("query", "key", "value"), "blocks.{layer}.attn.qkv.{kind}", out, leftovers)
    # silu is applied to the first half of w12: gate first, then the value ("up") projection
    concat_groups(gate_up, ("gate_proj", "up_proj"), "blocks.{layer}.mlp.w12.{kind}", out, leftovers)
    out.update(leftovers)
    return out


def hints_from_hf_config(config: dict) -> dict:
    """Architecture facts that shapes alone do not reveal, checked against what lvd implements."""
    act = config.get("hidden_act", "gelu")
    if not config.get("use_swiglu_ffn", False) and act != "gelu":
        raise WeightsError(f"Hugging Face config uses hidden_act={act!r}; lvd's DINOv2 implements exact GELU")
    eps = config.get("layer_norm_eps", 1e-6)
    if abs(eps - 1e-6) > 1e-12:
        raise WeightsError(f"Hugging Face config uses layer_norm_eps={eps}; DINOv2 uses 1e-6")
    hints = {}
    if "qkv_bias" in config:
        hints["qkv_bias"] = bool(config["qkv_bias"])
    return hints


def dinov2_facts(config: dict) -> dict:
    """DINOv2 architecture a Dinov2Config states (empty without a config)."""
    if not config:
        return {}
    swiglu = bool(config.get("use_swiglu_ffn", False))
    return {
        "embed_dim": int(config.get("hidden_size", 768)),
        "depth": int(config.get("num_hidden_layers", 12)),
        "num_heads": int(config.get("num_attention_heads", 12)),
        "patch_size": int(config.get("patch_size", 14)),
        "num_register_tokens": int(config.get("num_register_tokens", 0)),
        "ffn_layer": "swiglu" if swiglu else "mlp",
        "mlp_ratio": float(config.get("mlp_ratio", 4)),
    }
