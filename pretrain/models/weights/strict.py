"""Strict state-dict loading whose errors name every offending key."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lvd.common.errors import InputFormatError


class WeightsError(InputFormatError):
    """Weights that do not fit the model (or cannot be read); the message names the keys."""


def _short(keys: list[str], limit: int = 20) -> str:
    head = ", ".join(keys[:limit])
    return head + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Raise `WeightsError` listing missing keys, unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{key}: weights {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_short(mismatched)}")
    if problems:
        raise WeightsError(f"{source} do not fit the model — " + "; ".join(problems))


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "weights") -> nn.Module:
    """Check, then copy the tensors in (cast to each parameter's dtype)."""
    check_state_dict(model, state_dict, source)
    model.load_state_dict(dict(state_dict), strict=True)
    return model
