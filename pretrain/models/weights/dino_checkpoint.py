"""DINO v1 training checkpoints (`*_full_checkpoint.pth`, `checkpoint.pth` of main_dino.py).

They hold `student`, `teacher`, `optimizer`, `epoch`, `args` and `dino_loss`; `args` is the
run's argparse.Namespace, a plain record that the weights-only unpickler is allowed to rebuild
here (nothing else is). The backbone is the teacher's, under `backbone.` (and DDP's `module.`
for the ResNet), beside the projection `head.`, which is not part of the backbone. DINO's own
evaluation reads the teacher the same way.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

from lvd.pretrain.models.weights.hub import strip_prefixes

# DINO's --arch values and the registry names they stand for, by patch size (None: a ConvNet)
_ARCHS = {
    ("vit_small", 16): "dino_vits16",
    ("vit_small", 8): "dino_vits8",
    ("vit_base", 16): "dino_vitb16",
    ("vit_base", 8): "dino_vitb8",
    ("resnet50", None): "dino_resnet50",
}


def torch_load(path, **kwargs) -> Any:
    """torch.load(weights_only=True), with DINO's argparse.Namespace allowed."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)


def is_dino_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("teacher"), Mapping) and "student" in obj


def teacher_backbone(ckpt: Mapping) -> dict[str, torch.Tensor]:
    state = strip_prefixes(ckpt["teacher"], ("module.",))
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    return backbone or {k: v for k, v in state.items() if not k.startswith("head.")}


def arch_from_args(ckpt: Mapping) -> str | None:
    """The registry name of the run's --arch / --patch_size, when it is one of DINO's released ones."""
    args = ckpt.get("args")
    arch = getattr(args, "arch", None)
    patch = None if arch == "resnet50" else getattr(args, "patch_size", None)
    return _ARCHS.get((arch, patch))
