"""What every Hugging Face key map shares: the folder's config, wrapper prefixes, renames, fusing."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from lvd.pretrain.models.weights.hub import strip_prefixes

# `dinov2.`/`vit.` wrap a backbone inside a task model, `backbone.` inside another project's model;
# `model.` is how transformers >= 5 names some modules in memory (what torch.save(state_dict()) holds).
HF_PREFIXES = ("dinov2.", "vit.", "backbone.")


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def strip_hf_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wrapper prefixes shared by all keys, then `model.` wherever it starts a key."""
    out = strip_prefixes(state_dict, HF_PREFIXES + ("model.",))
    return {k[len("model.") :] if k.startswith("model.") else k: v for k, v in out.items()}


def rename(key: str, renames) -> str:
    """The first (pattern, replacement) of `renames` that matches `key` applied; `key` if none does."""
    for pattern, replacement in renames:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return key


def concat_groups(groups: dict, order: tuple[str, ...], target: str, out: dict, leftovers: dict) -> None:
    """Concatenate complete groups along dim 0; incomplete ones stay under their HF names.

    `groups` maps (layer, kind) to {part: (original key, tensor)}; `target` is formatted with
    layer and kind. What stays behind is reported by strict loading (with the missing target).
    """
    for (layer, kind), parts in groups.items():
        if all(name in parts for name in order):
            out[target.format(layer=layer, kind=kind)] = torch.cat([parts[name][1] for name in order], dim=0)
        else:
            for original, tensor in parts.values():
                leftovers[original] = tensor
