"""`build_backbone`: registry entry + weights file -> a ready DinoVisionTransformer."""

from __future__ import annotations

import os

from torch import nn

from lvd.pretrain.models.registry import get_spec
from lvd.pretrain.models.vision_transformer import DinoVisionTransformer
from lvd.pretrain.models.weights import WeightsError, load_strict, load_weights, weights_arch_name


def build_backbone(name: str, weights: str | os.PathLike | None = None, **overrides) -> nn.Module:
    """Build `name` from the registry and load `weights` strictly (None = random init).

    `name` "auto" takes the architecture (and its overrides) that a self-describing file records.

    The file may adjust storage details it determines (the stored position grid, how the
    grid is resampled); explicit `overrides` win over both the registry and the file.
    """
    loaded = load_weights(weights) if weights is not None else None
    if name == "auto":
        if loaded is None or loaded.arch_name is None:
            raise WeightsError(
                "model 'auto' needs a weights file that names its architecture (an lvd checkpoint or "
                f"an lvd-exported .safetensors); {weights or 'no weights'} does not: name the model"
            )
        name = loaded.arch_name
    spec = get_spec(name)
    arch = dict(spec.arch)
    if loaded is not None:
        if loaded.arch_name is not None and loaded.arch_name != name:
            raise WeightsError(f"{loaded.source} holds a {loaded.arch_name} backbone, not {name}")
        arch.update(loaded.hints)
    arch.update(overrides)
    spec.with_overrides(**arch)  # rejects unknown argument names with a clear message
    model = DinoVisionTransformer(**arch)
    if loaded is not None:
        load_strict(model, loaded.state_dict, source=f"{loaded.format} weights {loaded.source}")
    return model


def model_name(name: str, weights: str | os.PathLike | None) -> str:
    """The registry name `name` stands for: itself, or for "auto" the one the weights file records."""
    if name != "auto":
        return name
    if weights is None:
        raise WeightsError("model 'auto' needs a weights file that names its architecture; name the model")
    name = weights_arch_name(weights)
    if name is None:
        raise WeightsError(
            f"{weights} does not name its architecture (only lvd checkpoints and lvd-exported "
            ".safetensors do): name the model"
        )
    return name
