"""A TorchScript image model as an embedder (SSCD's release format)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch

from lvd.common.devices import resolve_device, resolve_dtype
from lvd.pretrain.models.pixel_embedder import TorchEmbedder
from lvd.pretrain.models.registry import IMAGENET_MEAN, IMAGENET_STD
from lvd.pretrain.models.weights import resolve_weights


class CopyDetectionEmbedder(TorchEmbedder):
    """Any TorchScript module mapping B x 3 x H x W to B x dim descriptors (SSCD's release format).

    Copy-detection descriptors are trained so that edited copies stay close and merely similar
    images do not, which is what near-duplicate removal needs.
    """

    def __init__(
        self,
        weights: str | os.PathLike,
        resolution: int = 288,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        resize_ratio: float = 1.0,
    ) -> None:
        self.weights = str(weights)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        path = resolve_weights(weights)
        with warnings.catch_warnings():  # deprecated in torch >= 2.9, yet the format SSCD is released in
            warnings.simplefilter("ignore", DeprecationWarning)
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        self.resolution = int(resolution)
        self.resize_ratio = float(resize_ratio)
        self.mean, self.std = tuple(mean), tuple(std)
        probe = torch.zeros(1, self.resolution, self.resolution, 3, dtype=torch.uint8)
        self.dim = int(self.embed_uint8(probe).shape[1])

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if out.ndim != 2:
            raise ValueError(f"copy-detection model returned shape {tuple(out.shape)}, expected B x dim")
        return out

    kind = "torchscript"
