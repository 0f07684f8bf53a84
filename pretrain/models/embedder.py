"""Images -> L2-normalised vectors with a backbone (or a TorchScript copy-detection model).

Both embedders share one path: uint8 squares in, normalised on the device, forward under the
chosen precision, float32 L2-normalised rows out. `embed_uint8` is what a DataLoader feeds;
`embed_pil` / `embed_bytes` are for callers holding images (the lookup service, tests).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .build import build_backbone
from .precision import autocast, resolve_device, resolve_dtype
from .preprocess import bytes_to_square, check_resolution, normalise, pil_to_square
from .registry import IMAGENET_MEAN, IMAGENET_STD, get_spec
from .weights import resolve_weights

log = logging.getLogger(__name__)


class _PixelEmbedder:
    """Shared batching, preprocessing and precision handling; subclasses define `_features`."""

    resolution: int
    resize_ratio: float
    mean: tuple
    std: tuple
    device: torch.device
    dtype: torch.dtype

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def embed_uint8(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 B x H x W x 3 (already resized and cropped) -> float32 B x dim, unit rows."""
        batch = torch.as_tensor(batch)
        if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 B x H x W x 3 batch, got {tuple(batch.shape)} {batch.dtype}")
        x = normalise(batch, self.mean, self.std, self.device)
        with autocast(self.device, self.dtype):
            feats = self._features(x)
        return F.normalize(feats.float(), dim=-1).cpu().numpy()

    def prepare_pil(self, img: Image.Image) -> np.ndarray:
        return pil_to_square(img, self.resolution, self.resize_ratio)

    def prepare_bytes(self, data: bytes, **decode_kwargs) -> np.ndarray:
        return bytes_to_square(data, self.resolution, self.resize_ratio, **decode_kwargs)

    def embed_pil(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        return self._embed_prepared([self.prepare_pil(img) for img in images], batch_size)

    def embed_bytes(self, blobs: Sequence[bytes], batch_size: int = 64) -> np.ndarray:
        return self._embed_prepared([self.prepare_bytes(b) for b in blobs], batch_size)

    def _embed_prepared(self, squares: list[np.ndarray], batch_size: int) -> np.ndarray:
        if not squares:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = [self.embed_uint8(np.stack(squares[i : i + batch_size])) for i in range(0, len(squares), batch_size)]
        return np.concatenate(chunks)


class Embedder(_PixelEmbedder):
    """A registry backbone with its weights: CLS (optionally CLS ⊕ mean patch token) per image.

    With `cls_and_mean_patch` the two halves are L2-normalised separately and the result
    scaled by 1/sqrt(2), so each half weighs the same in a cosine similarity.
    """

    def __init__(
        self,
        name: str,
        weights: str | os.PathLike | None,
        resolution: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        cls_and_mean_patch: bool = False,
        resize_ratio: float = 1.0,
    ) -> None:
        spec = get_spec(name)
        self.name = name
        self.weights = str(weights) if weights is not None else None
        if weights is None:
            log.warning("embedder %s has random weights: its embeddings carry no meaning", name)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = build_backbone(name, weights).eval().to(self.device)
        self.resolution = check_resolution(resolution or spec.resolution, spec.patch_size)
        self.resize_ratio = float(resize_ratio)
        self.mean, self.std = tuple(spec.mean), tuple(spec.std)
        self.cls_and_mean_patch = bool(cls_and_mean_patch)
        self.dim = self.model.embed_dim * (2 if cls_and_mean_patch else 1)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_features(x)
        cls = out["x_norm_clstoken"]
        if not self.cls_and_mean_patch:
            return cls
        patch = out["x_norm_patchtokens"].mean(dim=1)
        halves = (F.normalize(cls.float(), dim=-1), F.normalize(patch.float(), dim=-1))
        return torch.cat(halves, dim=-1) / np.sqrt(2.0)

    def info(self) -> dict:
        return {
            "model": self.name,
            "weights": self.weights,
            "resolution": self.resolution,
            "resize_ratio": self.resize_ratio,
            "mean": list(self.mean),
            "std": list(self.std),
            "dim": self.dim,
            "dtype": str(self.dtype).replace("torch.", ""),
            "cls_and_mean_patch": self.cls_and_mean_patch,
        }


class CopyDetectionEmbedder(_PixelEmbedder):
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

    def info(self) -> dict:
        return {
            "weights": self.weights,
            "resolution": self.resolution,
            "mean": list(self.mean),
            "std": list(self.std),
            "dim": self.dim,
            "dtype": str(self.dtype).replace("torch.", ""),
        }
