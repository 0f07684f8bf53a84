"""Axial rotary position embedding (RoPE), the only position signal of the DINOv3 ViTs.

Each patch has a (row, column) coordinate in [-1, 1] per axis (patch centres, each axis
normalised by its own length, so any grid maps onto the same square). A quarter of each head's
channels turns by angles proportional to the row, a quarter by the column; the rotation pairs
channel i with channel i + head_dim/2 ("rotate half"). Queries and keys of the patch tokens are
rotated; the class and storage tokens in front of them are not. Because attention then sees
only coordinate differences, no position table has to be resampled for a new input size.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_periods(head_dim: int, base: float = 100.0) -> torch.Tensor:
    """The head_dim/4 periods base^(4j/head_dim), j = 0..head_dim/4-1 (float32)."""
    if head_dim % 4:
        raise ValueError(f"RoPE needs a head width divisible by 4, got {head_dim}")
    exponents = torch.arange(head_dim // 4, dtype=torch.float32) * (4.0 / head_dim)
    return float(base) ** exponents


def patch_coordinates(h: int, w: int, device=None) -> torch.Tensor:
    """(h*w) x 2 row-major (row, column) patch centres, each axis scaled to [-1, 1] on its own."""
    rows = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
    cols = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(h * w, 2)
    return grid * 2.0 - 1.0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] over the last axis: the 90-degree turn of each (i, i + D/2) channel pair."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate the last sin.shape[0] tokens of x (B x heads x N x head_dim); the first ones stay.

    The rotation runs in float32 (the angles of distant patches need it under bf16) and the
    result returns in x's dtype.
    """
    n_rotated = sin.shape[-2]
    prefix, patches = x[..., : x.shape[-2] - n_rotated, :], x[..., x.shape[-2] - n_rotated :, :]
    p32 = patches.float()
    turned = p32 * cos + rotate_half(p32) * sin
    return torch.cat((prefix, turned.to(x.dtype)), dim=-2)


class RopePositionEmbedding(nn.Module):
    """sin/cos tables (h*w x head_dim) for an h x w patch grid.

    `periods` is a stored buffer (the released DINOv3 files carry it; a model distilled with
    bf16 positions stores bf16-rounded values, which are used as stored). In training mode the
    coordinates may be augmented as DINOv3 trains: `shift` adds U(-s, s) per axis, `jitter`
    scales each axis by a log-uniform factor in [1/j, j], `rescale` scales both axes by one
    log-uniform factor in [1/r, r]. Evaluation uses the plain coordinates.
    """

    def __init__(
        self,
        head_dim: int,
        base: float = 100.0,
        shift: float | None = None,
        jitter: float | None = None,
        rescale: float | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = float(base)
        self.shift, self.jitter, self.rescale = shift, jitter, rescale
        self.register_buffer("periods", rope_periods(head_dim, base), persistent=True)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.periods.copy_(rope_periods(self.head_dim, self.base))

    @property
    def augments(self) -> bool:
        """Whether a forward in the current mode draws random coordinates."""
        return self.training and any(v is not None for v in (self.shift, self.jitter, self.rescale))

    def _augment(self, coords: torch.Tensor) -> torch.Tensor:
        dev = coords.device
        if self.shift is not None:
            coords = coords + torch.empty(2, device=dev).uniform_(-self.shift, self.shift)
        if self.jitter is not None:
            span = math.log(self.jitter)
            coords = coords * torch.empty(2, device=dev).uniform_(-span, span).exp()
        if self.rescale is not None:
            span = math.log(self.rescale)
            coords = coords * torch.empty(1, device=dev).uniform_(-span, span).exp()
        return coords

    def forward(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        coords = patch_coordinates(h, w, self.periods.device)
        if self.training:
            coords = self._augment(coords)
        # (hw, 2, head_dim/4) angles, laid out [rows | columns] and repeated for the two halves
        angles = (2.0 * math.pi) * coords[:, :, None] / self.periods.float()[None, None, :]
        angles = angles.reshape(h * w, -1).repeat(1, 2)
        return angles.sin(), angles.cos()
