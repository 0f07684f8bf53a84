"""Hugging Face `DINOv3ViTModel` and `DINOv3ConvNextModel` keys -> Meta's DINOv3 hub layouts.

ViT: transformers keeps separate q/k/v projections without a key bias; Meta's files fuse them
into `attn.qkv` with a key bias that `bias_mask` zeroes. The key bias is rebuilt as zeros with
that mask (the same computation). The mask token is 1 x 1 x D there, 1 x D in Meta's layout;
the register tokens are Meta's `storage_tokens`; the RoPE periods are not stored (transformers
recomputes them), so lvd computes them from the formula. SwiGLU models name their gate, value
and output projections `gate_proj`/`up_proj`/`down_proj` (Meta: `w1`/`w2`/`w3`).

ConvNeXt: `stages.{i}.downsample_layers.{k}` and `stages.{i}.layers.{j}` become Meta's
`downsample_layers.{i}.{k}` and `stages.{i}.{j}`; the final `layer_norm` is Meta's `norm`, which
Meta's files store a second time as `norms.3`.

Saved files use `layer.{i}…`/`stages…`; transformers >= 5 prefixes them with `model.` in memory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from lvd.pretrain.models.layers.attention import key_bias_mask
from lvd.pretrain.models.weights.hf_common import rename, strip_hf_prefixes
from lvd.pretrain.models.weights.strict import WeightsError

_VIT_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.register_tokens$", "storage_tokens"),
    (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
    (r"^layer\.(\d+)\.norm(\d)\.", r"blocks.\1.norm\2."),
    (r"^layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^norm\.", "norm."),
)
_QKV = re.compile(r"^layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")
_MLP = re.compile(r"^layer\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)$")
_GATED = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}
_PLAIN = {"up_proj": "fc1", "down_proj": "fc2"}

_CONVNEXT_RENAMES = (
    (r"^stages\.(\d+)\.downsample_layers\.(\d+)\.", r"downsample_layers.\1.\2."),
    (r"^stages\.(\d+)\.layers\.(\d+)\.depthwise_conv\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d+)\.layers\.(\d+)\.pointwise_conv(\d)\.", r"stages.\1.\2.pwconv\3."),
    (r"^stages\.(\d+)\.layers\.(\d+)\.layer_norm\.", r"stages.\1.\2.norm."),
    (r"^stages\.(\d+)\.layers\.(\d+)\.gamma$", r"stages.\1.\2.gamma"),
)


def is_dinov3_vit_layout(keys) -> bool:
    return "embeddings.register_tokens" in keys and any(k.startswith("layer.") for k in keys)


def is_dinov3_convnext_layout(keys) -> bool:
    return any(re.match(r"^stages\.\d+\.(layers|downsample_layers)\.", k) for k in keys)


def _fuse_qkv(parts: dict, layer: str) -> dict[str, torch.Tensor]:
    """q/k/v -> Meta's fused projection; a missing key bias becomes a zero key bias masked out."""
    if not all(p in parts.get("weight", {}) for p in "qkv"):
        return {f"layer.{layer}.attention.{p}_proj.weight": t for p, t in parts.get("weight", {}).items()}
    weights = parts["weight"]
    out = {f"blocks.{layer}.attn.qkv.weight": torch.cat([weights[p] for p in "qkv"])}
    biases = parts.get("bias", {})
    if not biases:
        return out
    if "q" not in biases or "v" not in biases:
        raise WeightsError(
            f"layer {layer} has a bias on only some of its query and value projections; "
            "DINOv3's layout has both or neither"
        )
    dim = weights["q"].shape[0]
    key_bias = biases.get("k", torch.zeros(dim, dtype=biases["q"].dtype))
    out[f"blocks.{layer}.attn.qkv.bias"] = torch.cat([biases["q"], key_bias, biases["v"]])
    if "k" not in biases:
        out[f"blocks.{layer}.attn.qkv.bias_mask"] = key_bias_mask(3 * dim).to(biases["q"].dtype)
    return out


def dinov3_vit_hf_to_hub(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and fuse; keys that match nothing are kept so that strict loading names them."""
    state_dict = strip_hf_prefixes(state_dict)
    gated = any(".mlp.gate_proj." in k for k in state_dict)
    out: dict[str, torch.Tensor] = {}
    qkv: dict = {}
    for key, tensor in state_dict.items():
        if m := _QKV.match(key):
            qkv.setdefault(m[1], {}).setdefault(m[3], {})[m[2]] = tensor
        elif m := _MLP.match(key):
            layer_name = (_GATED if gated else _PLAIN).get(m[2])
            out[f"blocks.{m[1]}.mlp.{layer_name}.{m[3]}" if layer_name else key] = tensor
        elif key == "embeddings.mask_token":
            out["mask_token"] = tensor.reshape(1, -1)
        else:
            out[rename(key, _VIT_RENAMES)] = tensor
    for layer, parts in qkv.items():
        out.update(_fuse_qkv(parts, layer))
    return out


def dinov3_vit_facts(config: dict) -> tuple[dict, dict]:
    """(architecture a DINOv3ViTConfig states, storage details lvd applies even to a named model).

    transformers has no local-crop CLS norm (it is used only for local crops in training), so a
    folder of the 7B or of a satellite model loads without one.
    """
    hints = {"local_cls_norm": False}
    if not config:
        return {}, hints
    from lvd.pretrain.models.registry import swiglu_ratio

    dim, gated = int(config.get("hidden_size", 384)), bool(config.get("use_gated_mlp", False))
    act = config.get("hidden_act", "silu" if gated else "gelu")
    if act != ("silu" if gated else "gelu"):
        raise WeightsError(f"Hugging Face DINOv3 config uses hidden_act={act!r} with use_gated_mlp={gated}")
    biases = {bool(config.get("query_bias", True)), bool(config.get("value_bias", True))}
    if len(biases) > 1:
        raise WeightsError("Hugging Face DINOv3 config has a query bias without a value bias (or the reverse)")
    hidden = int(config.get("intermediate_size", 4 * dim))
    try:
        ffn_layer, ratio = swiglu_ratio(dim, hidden) if gated else ("mlp", hidden / dim)
    except ValueError as exc:
        raise WeightsError(f"Hugging Face DINOv3 config: {exc}") from None
    facts = {
        "embed_dim": dim,
        "depth": int(config.get("num_hidden_layers", 12)),
        "num_heads": int(config.get("num_attention_heads", 6)),
        "patch_size": int(config.get("patch_size", 16)),
        "num_register_tokens": int(config.get("num_register_tokens", 0)),
        "ffn_layer": ffn_layer,
        "mlp_ratio": ratio,
        "qkv_bias": biases.pop(),
    }
    hints.update(
        mask_k_bias=not bool(config.get("key_bias", False)),
        norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        rope_base=float(config.get("rope_theta", 100.0)),
    )
    return facts, hints


def dinov3_convnext_hf_to_hub(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state_dict = strip_hf_prefixes(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith("layer_norm."):
            out["norm." + key[len("layer_norm.") :]] = tensor
            out["norms.3." + key[len("layer_norm.") :]] = tensor
        else:
            out[rename(key, _CONVNEXT_RENAMES)] = tensor
    return out


def dinov3_convnext_facts(config: dict) -> tuple[dict, dict]:
    """(architecture a DINOv3ConvNextConfig states, storage details: none)."""
    if not config:
        return {}, {}
    eps, act = config.get("layer_norm_eps", 1e-6), config.get("hidden_act", "gelu")
    if eps != 1e-6 or act != "gelu":
        raise WeightsError(
            f"Hugging Face ConvNeXt config uses layer_norm_eps={eps}, hidden_act={act!r}; DINOv3's use 1e-6 and gelu"
        )
    facts = {
        "depths": tuple(int(d) for d in config.get("depths", (3, 3, 9, 3))),
        "dims": tuple(int(d) for d in config.get("hidden_sizes", (96, 192, 384, 768))),
    }
    return facts, {}
