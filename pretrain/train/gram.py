"""Gram anchoring (DINOv3, Simeoni et al. 2025, Sec. 4): keep the patch-similarity structure.

Over long training DINO's global features keep improving while its patch features lose their
locality: patches start to look like the CLS token and like each other. DINOv3 repairs this by
pulling the Gram matrix of the student's L2-normalised patch features (every patch's cosine
similarity to every other patch of the same image) towards that of a "Gram teacher", an
earlier copy of the EMA teacher whose patch features were still clean. Only the similarity
structure is anchored, not the features themselves, so the features keep learning.

The loss itself is `losses.gram_loss`; this module holds the Gram teacher and the resampling
of a higher-resolution teacher's patch grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lvd.pretrain.train.ssl import copy_parameters


def resize_patch_grid(patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """B x (h*w) x D patch features on an h x w grid, resampled bicubically to `size` (B x h'w' x D).

    DINOv3 resizes its high-resolution Gram teacher's features this way (bicubic, no
    antialiasing, on the features before their L2 normalisation).
    """
    if tuple(grid) == tuple(size):
        return patches
    b, n, d = patches.shape
    x = patches.float().transpose(1, 2).reshape(b, d, *grid)
    x = F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False, antialias=False)
    return x.flatten(2).transpose(1, 2)


class GramTeacher(nn.Module):
    """The frozen backbone the Gram targets come from, with the iteration it was copied at.

    Copied from the EMA model's backbone before global iteration `gram.start` (the first
    iteration with the loss on, if later) and every `gram.refresh` iterations after (0: never
    again). The copy and `taken_at` travel in checkpoints, so a resumed run uses the very same
    Gram teacher.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.taken_at: int | None = None

    def due(self, iteration: int, start: int, refresh: int) -> bool:
        """Whether to copy the EMA backbone before `iteration` (called where the loss is on)."""
        if iteration < start:
            return False
        if self.taken_at is None:
            return True
        return refresh > 0 and iteration > self.taken_at and (iteration - start) % refresh == 0

    @torch.no_grad()
    def take(self, ema: nn.Module, iteration: int) -> None:
        """Copy the EMA model's backbone parameters (`ema` is the whole EMA model: its FSDP root)."""
        for model in (ema, self):
            if hasattr(model, "reshard"):  # an FSDP2 root keeps its parameters gathered after forward
                model.reshard()
        copy_parameters(self.backbone, ema.backbone)
        self.taken_at = int(iteration)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Patch features (B x P x D). Called as a module, so that FSDP gathers the parameters."""
        return self.backbone.forward_features(crops)["x_norm_patchtokens"]

    @torch.no_grad()
    def targets(self, crops: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The Gram teacher's patch features of `crops`, on the student's patch grid."""
        patch = int(self.backbone.patch_size)
        own = (crops.shape[-2] // patch, crops.shape[-1] // patch)
        return resize_patch_grid(self(crops), own, grid)

    def train(self, mode: bool = True) -> GramTeacher:
        """The Gram teacher always runs in evaluation mode."""
        super().train(False)
        return self
