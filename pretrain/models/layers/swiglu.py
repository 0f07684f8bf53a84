"""The gated (SwiGLU) feed-forward network of ViT-g/14."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_features(in_features: int, mlp_ratio: float) -> int:
    """Two thirds of the plain MLP width, rounded up to a multiple of 8.

    The gate doubles the input projection, so 2/3 keeps the parameter count of a plain MLP;
    the rounding is what the released ViT-g/14 weights were trained with.
    """
    hidden = int(in_features * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """w12 projects to [gate | value] in one matmul; w3 maps silu(gate) * value back."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)
