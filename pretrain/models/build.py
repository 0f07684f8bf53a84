"""`build_backbone`: registry entry + weights file -> a ready DinoVisionTransformer."""

from __future__ import annotations

import os

from torch import nn

from .registry import get_spec
from .vision_transformer import DinoVisionTransformer
from .weights import WeightsError, load_strict, load_weights


def build_backbone(name: str, weights: str | os.PathLike | None = None, **overrides) -> nn.Module:
    """Build `name` from the registry and load `weights` strictly (None = random init).

    The file may adjust storage details it determines (the stored position grid, how the
    grid is resampled); explicit `overrides` win over both the registry and the file.
    """
    spec = get_spec(name)
    arch = dict(spec.arch)
    loaded = None
    if weights is not None:
        loaded = load_weights(weights)
        if loaded.arch_name is not None and loaded.arch_name != name:
            raise WeightsError(f"{loaded.source} holds a {loaded.arch_name} backbone, not {name}")
        arch.update(loaded.hints)
    arch.update(overrides)
    spec.with_overrides(**arch)  # rejects unknown argument names with a clear message
    model = DinoVisionTransformer(**arch)
    if loaded is not None:
        load_strict(model, loaded.state_dict, source=f"{loaded.format} weights {loaded.source}")
    return model
