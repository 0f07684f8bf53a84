"""Images -> L2-normalised vectors: a registry backbone, a TorchScript or an ONNX model.

Every embedder has one interface (`PixelEmbedder`): uint8 squares in (`embed_uint8`, what a
DataLoader feeds), float32 L2-normalised rows out; `embed_pil` / `embed_bytes` are for callers
holding images (the lookup service, tests); `info()` records what defines the space, and
`embedder_from_info` rebuilds the same embedder from that record. The torch embedders
normalise on the device and run under the chosen precision; the ONNX one
(`onnx_embedder.OnnxEmbedder`) feeds onnxruntime in the layout its graph declares.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lvd.common.devices import autocast, resolve_device, resolve_dtype
from lvd.pretrain.models.build import build_backbone, model_name
from lvd.pretrain.models.preprocess import bytes_to_square, check_resolution, normalise, pil_to_square
from lvd.pretrain.models.registry import IMAGENET_MEAN, IMAGENET_STD, get_spec
from lvd.pretrain.models.weights import resolve_weights

log = logging.getLogger(__name__)


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


class _TorchEmbedder(PixelEmbedder):
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


class Embedder(_TorchEmbedder):
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
        name = model_name(name, weights)  # "auto": the architecture a self-describing file records
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

    kind = "vit"

    def _extra_info(self) -> dict:
        return {"model": self.name, "cls_and_mean_patch": self.cls_and_mean_patch}


class CopyDetectionEmbedder(_TorchEmbedder):
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


def embedder_from_info(
    info: dict, device: str | torch.device = "cpu", dtype: str | None = None, threads: int | None = None
) -> PixelEmbedder:
    """Rebuild the embedder an `info()` record describes (the lookup service embeds queries so).

    Records written before `kind` existed are registry backbones.
    """
    kind = info.get("kind") or "vit"
    if info.get("weights") is None:
        raise ValueError("the record has no weights (random weights cannot be recreated)")
    resize_ratio = float(info.get("resize_ratio") or 1.0)
    if kind == "vit":
        return Embedder(
            info["model"],
            info["weights"],
            resolution=info.get("resolution"),
            device=device,
            dtype=dtype or "auto",
            cls_and_mean_patch=bool(info.get("cls_and_mean_patch", False)),
            resize_ratio=resize_ratio,
        )
    from lvd.pretrain.models.copy_detection import build_copy_detector

    if kind not in ("onnx", "torchscript"):
        raise ValueError(f"unknown embedder kind {kind!r}")
    norm = {k: info[k] for k in ("mean", "std") if info.get(k) is not None}
    return build_copy_detector(
        info["weights"],
        resolution=int(info["resolution"]),
        device=device,
        dtype=dtype or "float32",
        threads=threads,
        resize_ratio=resize_ratio,
        **norm,
    )
