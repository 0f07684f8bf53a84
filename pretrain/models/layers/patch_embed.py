"""Image -> sequence of patch vectors."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping p x p patches and project each to `embed_dim`.

    A stride-p convolution is exactly one shared linear map per patch, and is what the DINOv2
    checkpoints store (`patch_embed.proj`).
    """

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 384) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # B x N x D
