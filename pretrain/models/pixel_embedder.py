"""The embedder interface: uint8 squares in, L2-normalised float32 rows out.

`PixelEmbedder` is what every embedder offers (registry backbones, TorchScript and ONNX
copy-detection models); `TorchEmbedder` is the shared body of the torch ones: normalise on the
device, run under the chosen precision, L2-normalise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lvd.common.devices import autocast
from lvd.pretrain.models.preprocess import bytes_to_square, normalise, pil_to_square


def check_uint8_batch(batch) -> None:
    """Every embedder takes the same input: uint8 B x H x W x 3, already resized and cropped."""
    if batch.ndim != 4 or batch.shape[-1] != 3 or str(batch.dtype).rsplit(".", 1)[-1] != "uint8":
        raise ValueError(f"expected a uint8 B x H x W x 3 batch, got {tuple(batch.shape)} {batch.dtype}")


class PixelEmbedder:
    """The interface every embedder offers; subclasses define `embed_uint8` and `info`.

    resolution x resolution squares (shorter side resized to resolution x resize_ratio, centre
    crop) in, `dim` float32 L2-normalised values per image out.
    """

    resolution: int
    resize_ratio: float
    dim: int

    def embed_uint8(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 B x H x W x 3 (already resized and cropped) -> float32 B x dim, unit rows."""
        raise NotImplementedError

    def info(self) -> dict:
        raise NotImplementedError

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


class TorchEmbedder(PixelEmbedder):
    """A torch module on `device`: normalised on the device, run under `dtype`; subclasses define `_features`."""

    mean: tuple
    std: tuple
    device: torch.device
    dtype: torch.dtype

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    kind: str
    weights: str | None

    def _extra_info(self) -> dict:
        return {}

    def info(self) -> dict:
        return {
            "kind": self.kind,
            "weights": self.weights,
            "resolution": self.resolution,
            "resize_ratio": self.resize_ratio,
            "mean": list(self.mean),
            "std": list(self.std),
            "dim": self.dim,
            "dtype": str(self.dtype).replace("torch.", ""),
            **self._extra_info(),
        }

    @torch.inference_mode()
    def embed_uint8(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        batch = torch.as_tensor(batch)
        check_uint8_batch(batch)
        x = normalise(batch, self.mean, self.std, self.device)
        with autocast(self.device, self.dtype):
            feats = self._features(x)
        return F.normalize(feats.float(), dim=-1).cpu().numpy()
