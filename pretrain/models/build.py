"""`build_backbone`: registry entry + weights file -> a ready backbone (ViT, ConvNeXt or ResNet)."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from lvd.pretrain.models.registry import ModelSpec, backbone_class, get_spec
from lvd.pretrain.models.weights import WeightsError, load_strict, load_weights, weights_arch_name

log = logging.getLogger(__name__)


def build_backbone(name: str, weights: str | os.PathLike | None = None, **overrides) -> nn.Module:
    """Build `name` from the registry and load `weights` strictly (None = random init).

    `name` "auto" takes the architecture a weights file describes: an lvd export or checkpoint
    (its metadata), a Hugging Face folder (its config.json) or a file under the name Meta
    released it as. The file may adjust storage details it determines (the stored position
    grid, how the grid is resampled); explicit `overrides` win over both the registry and the
    file. The module carries `arch_name` and `arch_overrides` (the explicit overrides and those
    "auto" took from the file), which rebuild it together with the same weights file.
    """
    loaded = load_weights(weights) if weights is not None else None
    file_overrides: dict = {}
    if name == "auto":
        name, file_overrides = _auto_arch(loaded, weights)
    spec = get_spec(name)
    arch = dict(spec.arch)
    if loaded is not None:
        if loaded.arch_name is not None and loaded.arch_name != name:
            raise WeightsError(f"{loaded.source} holds a {loaded.arch_name} backbone, not {name}")
        arch.update({k: v for k, v in loaded.hints.items() if spec.accepts(k)})
    arch.update(file_overrides)
    arch.update(overrides)
    spec.with_overrides(**arch)  # rejects unknown argument names with a clear message
    model = backbone_class(spec.kind)(**arch)
    model.arch_name = name
    model.arch_overrides = {**file_overrides, **overrides}
    if loaded is not None:
        state = complete_state_dict(model, loaded.state_dict, spec, arch, loaded.format)
        load_strict(model, state, source=f"{loaded.format} weights {loaded.source}")
        _warn_normalisation(spec, loaded)
    return model


def _auto_arch(loaded, weights) -> tuple[str, dict]:
    if loaded is not None and loaded.arch_name is not None:
        return loaded.arch_name, {}
    if loaded is not None and loaded.suggested is not None:
        return loaded.suggested
    raise WeightsError(
        "model 'auto' needs a weights file that names its architecture (an lvd checkpoint or export, a "
        f"Hugging Face folder, or a file under Meta's release name); {weights or 'no weights'} does not: "
        "name the model"
    )


def complete_state_dict(model: nn.Module, state: dict, spec: ModelSpec, arch: dict, fmt: str = "hub") -> dict:
    """Add the entries a file may lack although the model holds them, and only those.

    - BatchNorm `num_batches_tracked` counters (older torchvision-style files have none; they
      only matter for momentum-free BatchNorm, which no DINO model uses): 0.
    - a mask token requested (`mask_token=True`, to train with masked patches) for a family
      whose files have none (DINO v1): zeros, its initial value.
    - the RoPE periods of a Hugging Face DINOv3 folder (transformers recomputes them rather than
      storing them): the model's own, from the formula and the config's base.
    Everything else must be in the file: strict loading names what is missing.
    """
    expected = model.state_dict()
    out = dict(state)
    for key, value in expected.items():
        if key in out:
            continue
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros_like(value)
        elif key == "mask_token" and arch.get("mask_token") and not spec.arch.get("mask_token", True):
            out[key] = torch.zeros_like(value)
        elif key == "rope_embed.periods" and fmt == "huggingface":
            out[key] = value
    return out


def _warn_normalisation(spec: ModelSpec, loaded) -> None:
    """Satellite weights normalise with their own statistics: say so when they sit under an LVD entry."""
    if spec.family == "dinov3" and "local_cls_norm.weight" in loaded.state_dict and not spec.arch.get("local_cls_norm"):
        log.warning(
            "%s holds a local_cls_norm, as DINOv3's satellite (SAT-493M) weights do; their inputs "
            "need the satellite statistics: use %s_sat493m",
            loaded.source,
            spec.name,
        )


def model_name(name: str, weights: str | os.PathLike | None) -> str:
    """The registry name `name` stands for: itself, or for "auto" the one the weights file records."""
    if name != "auto":
        return name
    if weights is None:
        raise WeightsError("model 'auto' needs a weights file that names its architecture; name the model")
    from lvd.pretrain.models.text_towers import pair_layout

    if pair_layout(weights) is not None:
        raise WeightsError(
            f"{weights} holds a CLIP or SigLIP model, not a registry backbone: its resolution comes from its "
            "preprocessor_config.json (leave the resolution unset)"
        )
    name = weights_arch_name(weights)
    if name is None:
        raise WeightsError(
            f"{weights} does not name its architecture (lvd checkpoints and exports, Hugging Face folders and "
            "files under Meta's release names do): name the model"
        )
    return name
