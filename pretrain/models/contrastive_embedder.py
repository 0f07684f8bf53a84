"""The image half of a CLIP / SigLIP pair as an lvd embedder, with its text half beside it.

`Embedder("auto", weights)` becomes this embedder when `weights` hold a contrastive pair
(`text_towers.pair_layout`), so `embed.model: auto` with a CLIP or SigLIP folder embeds a
collection with the image tower, and its `info()` record (written by the embed stage, kept by
the index) says that a text tower exists: the lookup service rebuilds it from that record
(`embedder_from_info`) to embed text queries into the same space.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from lvd.common.devices import autocast, resolve_device, resolve_dtype
from lvd.pretrain.models.pixel_embedder import TorchEmbedder
from lvd.pretrain.models.preprocess import check_resolution
from lvd.pretrain.models.text_towers import FAMILIES, TextTower, image_features, load_pair
from lvd.pretrain.models.weights.strict import WeightsError


class ContrastiveEmbedder(TorchEmbedder):
    """Images (uint8 squares) and texts -> unit vectors of one CLIP / SigLIP space."""

    kind = "contrastive"

    def __init__(
        self,
        weights: str | os.PathLike,
        resolution: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        cls_and_mean_patch: bool = False,
        resize_ratio: float = 1.0,
    ) -> None:
        if cls_and_mean_patch:
            raise WeightsError(
                "cls_and_mean_patch is for DINO backbones; a CLIP or SigLIP image tower gives one vector"
            )
        self.weights = str(weights)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.pair = load_pair(weights)
        self.pair.model.to(self.device)
        pre = self.pair.preprocessing
        self.resolution = check_resolution(int(resolution or pre.resolution), self.pair.patch_size)
        # the folder's own resize rule, unless the caller asked for another one
        self.resize_ratio = float(pre.resize_ratio if float(resize_ratio) == 1.0 else resize_ratio)
        self.mean, self.std = pre.mean, pre.std
        self.dim = self.pair.dim
        self._text: TextTower | None = None

    @property
    def has_text(self) -> bool:
        return self.pair.tokenizer_dir is not None

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return image_features(self.pair, x)

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        """float32 len(texts) x dim unit rows: the texts in the space of the images."""
        if self._text is None:
            self._text = TextTower(self.pair, self.device)
        with autocast(self.device, self.dtype):
            feats = self._text.features(list(texts))
        return F.normalize(feats.float(), dim=-1).cpu().numpy()

    def _extra_info(self) -> dict:
        return {"model": FAMILIES[self.pair.family], "weights_layout": self.pair.layout, "text_tower": self.has_text}
