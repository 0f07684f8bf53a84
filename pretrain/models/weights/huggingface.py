"""Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` keys -> the DINOv2 hub layout.

Hugging Face keeps separate query/key/value projections (concatenated here into `attn.qkv`)
and calls LayerScale `lambda1`. Saved checkpoints use the long-standing names
(`attention.attention.query`, `mlp.weights_in/weights_out`); transformers >= 5 names its
modules `attention.q_proj/…/o_proj` and `mlp.gate_proj/up_proj/down_proj` in memory, which is
what a `torch.save(model.state_dict())` holds. Both are accepted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from lvd.pretrain.models.weights.hub import strip_prefixes

_HF_PREFIXES = ("dinov2.", "backbone.", "model.")

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


def looks_like_hf(state_dict: Mapping[str, torch.Tensor]) -> bool:
    keys = strip_prefixes(state_dict, _HF_PREFIXES)
    return any(key.startswith(("embeddings.", "encoder.layer.")) for key in keys)


def _concat_groups(groups: dict, order: tuple[str, ...], target: str, out: dict, leftovers: dict) -> None:
    """Concatenate complete groups along dim 0; incomplete ones stay under their HF names."""
    for (layer, kind), parts in groups.items():
        if all(name in parts for name in order):
            out[target.format(layer=layer, kind=kind)] = torch.cat([parts[name][1] for name in order], dim=0)
        else:  # left as is, so that strict loading reports them (and the missing target)
            for original, tensor in parts.values():
                leftovers[original] = tensor


def hf_to_hub(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and fuse; keys that match nothing are kept so that strict loading names them."""
    state_dict = strip_prefixes(state_dict, _HF_PREFIXES)
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
        new = key
        for pattern, replacement in _RENAMES:
            new, count = re.subn(pattern, replacement, new)
            if count:
                break
        out[new] = tensor
    leftovers: dict = {}
    _concat_groups(qkv, ("query", "key", "value"), "blocks.{layer}.attn.qkv.{kind}", out, leftovers)
    # silu is applied to the first half of w12: gate first, then the value ("up") projection
    _concat_groups(gate_up, ("gate_proj", "up_proj"), "blocks.{layer}.mlp.w12.{kind}", out, leftovers)
    out.update(leftovers)
    return out


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def hints_from_hf_config(config: dict) -> dict:
    """Architecture facts that shapes alone do not reveal, checked against what lvd implements."""
    act = config.get("hidden_act", "gelu")
    if not config.get("use_swiglu_ffn", False) and act != "gelu":
        raise ValueError(f"Hugging Face config uses hidden_act={act!r}; lvd's ViT implements exact GELU")
    eps = config.get("layer_norm_eps", 1e-6)
    if abs(eps - 1e-6) > 1e-12:
        raise ValueError(f"Hugging Face config uses layer_norm_eps={eps}; lvd's ViT uses 1e-6")
    hints = {}
    if "qkv_bias" in config:
        hints["qkv_bias"] = bool(config["qkv_bias"])
    return hints
