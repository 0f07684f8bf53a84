"""Which DINO family a Hugging Face checkpoint holds, and its conversion to that family's hub layout.

The folder's config.json names the model type (`dinov2`, `dinov2_with_registers`, `vit` for
DINO v1, `dinov3_vit`, `dinov3_convnext`); a file without a config is recognised by its keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lvd.pretrain.models.weights.hf_common import strip_hf_prefixes
from lvd.pretrain.models.weights.hf_dinov3 import (
    dinov3_convnext_facts,
    dinov3_convnext_hf_to_hub,
    dinov3_vit_facts,
    dinov3_vit_hf_to_hub,
    is_dinov3_convnext_layout,
    is_dinov3_vit_layout,
)
from lvd.pretrain.models.weights.hf_vit import is_vit_layout, vit_facts, vit_hf_to_hub
from lvd.pretrain.models.weights.huggingface import dinov2_facts, hf_to_hub, hints_from_hf_config, is_dinov2_layout
from lvd.pretrain.models.weights.strict import WeightsError

_MODEL_TYPES = {
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
    "vit": "dino",
    "dinov3_vit": "dinov3_vit",
    "dinov3_convnext": "dinov3_convnext",
}
_DETECT = (  # key patterns, most specific first
    ("dinov3_convnext", is_dinov3_convnext_layout),
    ("dinov3_vit", is_dinov3_vit_layout),
    ("dino", is_vit_layout),
    ("dinov2", is_dinov2_layout),
)


def hf_layout(state_dict: Mapping[str, torch.Tensor], config: dict | None = None) -> str | None:
    """dinov2 | dino | dinov3_vit | dinov3_convnext, or None for keys of no transformers model lvd reads."""
    model_type = (config or {}).get("model_type")
    if model_type is not None:
        if model_type not in _MODEL_TYPES:
            raise WeightsError(
                f"Hugging Face model_type {model_type!r} is not a DINO backbone lvd reads "
                f"({', '.join(sorted(_MODEL_TYPES))})"
            )
        return _MODEL_TYPES[model_type]
    keys = set(strip_hf_prefixes(state_dict))
    for layout, matches in _DETECT:
        if matches(keys):
            return layout
    return None


def looks_like_hf(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return hf_layout(state_dict) is not None


@dataclass
class Converted:
    state_dict: dict[str, torch.Tensor]  # the family's hub layout
    hints: dict  # storage details applied to any named model
    family: str
    kind: str
    facts: dict  # the architecture the config states (for `auto`)


def from_huggingface(state_dict: Mapping[str, torch.Tensor], config: dict | None = None) -> Converted:
    config = config or {}
    layout = hf_layout(state_dict, config)
    if layout == "dinov2" or layout is None:
        hub = hf_to_hub(state_dict)
        with_registers = "register_tokens" in hub or config.get("model_type") == "dinov2_with_registers"
        # Hugging Face resamples position embeddings to the exact grid (antialiased with registers)
        hints = {"interpolate_offset": 0.0, "interpolate_antialias": bool(with_registers)}
        hints.update(hints_from_hf_config(config))
        return Converted(hub, hints, "dinov2", "vit", dinov2_facts(config))
    if layout == "dino":
        facts, hints = vit_facts(config)
        return Converted(vit_hf_to_hub(state_dict), hints, "dino", "vit", facts)
    if layout == "dinov3_vit":
        facts, hints = dinov3_vit_facts(config)
        return Converted(dinov3_vit_hf_to_hub(state_dict), hints, "dinov3", "vit", facts)
    facts, hints = dinov3_convnext_facts(config)
    return Converted(dinov3_convnext_hf_to_hub(state_dict), hints, "dinov3", "convnext", facts)
