"""Per-channel residual scaling (CaiT's LayerScale)."""

from __future__ import annotations

import torch
from torch import nn


class LayerScale(nn.Module):
    """Multiply a residual branch by a learned per-channel `gamma`, started small.

    A small start (1e-5 in DINOv2) lets deep ViTs train stably: each block begins close to
    the identity.
    """

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
