"""Hugging Face `ViTModel` keys (the `facebook/dino-vit*` folders) -> DINO v1's hub layout.

transformers converted DINO's four ViTs into its generic ViT: separate query/key/value
projections (fused here into `attn.qkv`), `layernorm_before/after` for the block norms,
`intermediate.dense`/`output.dense` for the MLP. Saved files use those long-standing names;
transformers >= 5 names the modules `layers.{i}.attention.q_proj/…/o_proj` and `layers.{i}.mlp.fc1/fc2`
in memory. Both are accepted. The converted folders carry no pooler weights (a `ViTModel` built
with one initialises it at random), so a `pooler.*` entry is not part of the backbone and is left out.

Their config.json says layer_norm_eps 1e-12, transformers' default; DINO trained with 1e-6,
which is what lvd uses.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch

from lvd.pretrain.models.weights.hf_common import concat_groups, rename, strip_hf_prefixes
from lvd.pretrain.models.weights.strict import WeightsError

log = logging.getLogger(__name__)

_LAYER = r"^(?:encoder\.layer|layers)\.(\d+)\."
_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (_LAYER + r"layernorm_before\.", r"blocks.\1.norm1."),
    (_LAYER + r"layernorm_after\.", r"blocks.\1.norm2."),
    (_LAYER + r"attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (_LAYER + r"attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (_LAYER + r"intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (_LAYER + r"output\.dense\.", r"blocks.\1.mlp.fc2."),
    (_LAYER + r"mlp\.fc(\d)\.", r"blocks.\1.mlp.fc\2."),
    (r"^layernorm\.", "norm."),
)
_QKV = re.compile(_LAYER + r"attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$")
_PART = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}


def is_vit_layout(keys) -> bool:
    return any(re.match(_LAYER + r"layernorm_before\.", key) for key in keys)


def vit_hf_to_hub(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and fuse; keys that match nothing are kept so that strict loading names them."""
    state_dict = strip_hf_prefixes(state_dict)
    out: dict[str, torch.Tensor] = {}
    qkv: dict = {}
    for key, tensor in state_dict.items():
        if key.startswith("pooler."):
            log.info("leaving out %s: the pooler is not part of DINO's backbone", key)
            continue
        if m := _QKV.match(key):
            qkv.setdefault((m[1], m[3]), {})[_PART.get(m[2], m[2])] = (key, tensor)
            continue
        out[rename(key, _RENAMES)] = tensor
    leftovers: dict = {}
    concat_groups(qkv, ("query", "key", "value"), "blocks.{layer}.attn.qkv.{kind}", out, leftovers)
    out.update(leftovers)
    return out


def vit_facts(config: dict) -> tuple[dict, dict]:
    """(DINO v1 architecture a ViTModel config states, storage details).

    transformers resamples position embeddings to the exact grid (no offset, no antialiasing),
    and lvd reproduces what transformers computes for a transformers folder.
    """
    hints = {"interpolate_offset": 0.0, "interpolate_antialias": False}
    if not config:
        return {}, hints
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise WeightsError(f"Hugging Face ViT config uses hidden_act={act!r}; DINO's ViTs use exact GELU")
    dim = int(config.get("hidden_size", 768))
    eps = config.get("layer_norm_eps")
    if eps is not None and eps != 1e-6:
        log.info("Hugging Face ViT config says layer_norm_eps=%s; DINO's ViTs normalise with 1e-6, as lvd does", eps)
    facts = {
        "embed_dim": dim,
        "depth": int(config.get("num_hidden_layers", 12)),
        "num_heads": int(config.get("num_attention_heads", 12)),
        "mlp_ratio": int(config.get("intermediate_size", 4 * dim)) / dim,
        "patch_size": int(config.get("patch_size", 16)),
        "qkv_bias": bool(config.get("qkv_bias", True)),
    }
    return facts, hints
