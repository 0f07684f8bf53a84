"""The hub layouts of the DINO families (what `torch.hub` checkpoints and lvd exports store)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# dinov2 training runs with block_chunks > 0 store blocks as blocks.{chunk}.{index}.
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
# Wrappers that prefix the backbone keys in training checkpoints.
_PREFIXES = ("module.", "backbone.", "teacher.backbone.", "_orig_mod.")


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes=_PREFIXES) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix shared by every key (DDP `module.`, `backbone.`, compile's `_orig_mod.`)."""
    out = dict(state_dict)
    changed = True
    while changed and out:
        changed = False
        for prefix in prefixes:
            if all(key.startswith(prefix) for key in out):
                out = {key[len(prefix) :]: value for key, value in out.items()}
                changed = True
    return out


def unchunk_blocks(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """blocks.{chunk}.{i}.… -> blocks.{i}.… (the chunk index is redundant: i is global)."""
    if not any(_CHUNKED_BLOCK.match(key) for key in state_dict):
        return dict(state_dict)
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", key): value for key, value in state_dict.items()}


def to_hub_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A hub-style state dict, normalised: wrapper prefixes and block chunks removed."""
    return unchunk_blocks(strip_prefixes(state_dict))


def grid_side(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """Side of the stored square position grid, from `pos_embed` (None when absent)."""
    pos = state_dict.get("pos_embed")
    if pos is None:
        return None
    side = int(round((pos.shape[1] - 1) ** 0.5))
    return side if side * side == pos.shape[1] - 1 else None
