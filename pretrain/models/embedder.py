"""Images -> L2-normalised vectors: a registry backbone, a TorchScript or an ONNX model.

Every embedder has one interface (`PixelEmbedder`): uint8 squares in (`embed_uint8`, what a
DataLoader feeds), float32 L2-normalised rows out; `embed_pil` / `embed_bytes` are for callers
holding images (the lookup service, tests); `info()` records what defines the space, and
`embedder_from_info` rebuilds the same embedder from that record. The torch embedders
normalise on the device and run under the chosen precision; the ONNX one
(`onnx_embedder.OnnxEmbedder`) feeds onnxruntime in the layout its graph declares.

`Embedder("auto", weights)` with weights that hold a CLIP or SigLIP pair is that pair's image
tower (`contrastive_embedder.ContrastiveEmbedder`, which also embeds text).

Imports run one way: `pixel_embedder` (the interface) <- `onnx_embedder`, `torchscript_embedder`
<- `copy_detection`, `contrastive_embedder` <- this module.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from lvd.common.devices import resolve_device, resolve_dtype
from lvd.pretrain.models.build import build_backbone
from lvd.pretrain.models.copy_detection import build_copy_detector
from lvd.pretrain.models.pixel_embedder import PixelEmbedder, TorchEmbedder, check_uint8_batch
from lvd.pretrain.models.preprocess import check_resolution
from lvd.pretrain.models.registry import get_spec
from lvd.pretrain.models.text_towers import pair_layout

__all__ = ["Embedder", "PixelEmbedder", "check_uint8_batch", "embedder_from_info"]

log = logging.getLogger(__name__)


class Embedder(TorchEmbedder):
    """A registry backbone with its weights: CLS (optionally CLS ⊕ mean patch token) per image.

    Any backbone of the DINO family: a ViT's normalised CLS token, a ConvNet's pooled feature
    (what Meta's models return), and their patch tokens or last-map cells for the mean.

    With `cls_and_mean_patch` the two halves are L2-normalised separately and the result
    scaled by 1/sqrt(2), so each half weighs the same in a cosine similarity.

    With name "auto" and weights holding a CLIP or SigLIP pair (a Hugging Face folder, open_clip
    or OpenAI's release), the embedder made is that pair's `ContrastiveEmbedder` instead.
    """

    def __new__(cls, name: str, weights=None, *args, **kwargs):
        if name == "auto" and weights is not None and pair_layout(weights) is not None:
            from lvd.pretrain.models.contrastive_embedder import ContrastiveEmbedder

            return ContrastiveEmbedder(weights, *args, **kwargs)
        return super().__new__(cls)

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
        self.weights = str(weights) if weights is not None else None
        if weights is None:
            log.warning("embedder %s has random weights: its embeddings carry no meaning", name)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # "auto": the architecture the weights file describes (lvd metadata, config.json, release name)
        self.model = build_backbone(name, weights).eval().to(self.device)
        spec = get_spec(self.model.arch_name)
        # recorded as "auto" when the file's own description (not a registry entry alone) rebuilds it
        self.name = "auto" if name == "auto" and self.model.arch_overrides else self.model.arch_name
        self.resolution = check_resolution(resolution or spec.resolution, int(self.model.patch_size))
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

    kind = "vit"  # every registry backbone (ConvNets too): the name records written embeddings carry

    def _extra_info(self) -> dict:
        return {"model": self.name, "cls_and_mean_patch": self.cls_and_mean_patch}


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
    if kind == "contrastive":
        from lvd.pretrain.models.contrastive_embedder import ContrastiveEmbedder

        return ContrastiveEmbedder(
            info["weights"],
            resolution=info.get("resolution"),
            device=device,
            dtype=dtype or "auto",
            resize_ratio=resize_ratio,
        )
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
