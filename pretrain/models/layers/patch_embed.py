"""Image -> sequence of patch vectors."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping p x p patches and project each to `embed_dim`.

    A stride-p convolution is exactly one shared linear map per patch, and is what the DINO
    checkpoints store (`patch_embed.proj`). Sides that are not multiples of p are an error
    (DINOv2's rule) unless `crop_remainder`, which drops the last rows and columns that do not
    fill a patch, as DINO v1 and DINOv3 do.
    """

    def __init__(
        self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 384, crop_remainder: bool = False
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.crop_remainder = crop_remainder
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid (rows, columns) of a height x width input."""
        if not self.crop_remainder and (height % self.patch_size or width % self.patch_size):
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid(*x.shape[-2:])
        return self.proj(x).flatten(2).transpose(1, 2)  # B x N x D (the convolution floors)
