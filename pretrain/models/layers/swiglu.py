"""The gated (SwiGLU) feed-forward network of DINOv2 ViT-g and the DINOv3 S+/L+/H+/7B ViTs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_features(in_features: int, mlp_ratio: float, align: int = 8) -> int:
    """Two thirds of the plain MLP width, rounded up to a multiple of `align`.

    The gate doubles the input projection, so 2/3 keeps the parameter count of a plain MLP;
    the rounding is what the released weights were trained with (8 for DINOv2 ViT-g and the
    DINOv3 S+/L+/H+, 64 for the DINOv3 7B).
    """
    hidden = int(int(in_features * mlp_ratio) * 2 / 3)
    return -(-hidden // align) * align


class SwiGLUFFN(nn.Module):
    """silu(gate) * value, mapped back by w3.

    `fused` keeps gate and value in one `w12` projection ([gate | value], DINOv2's layout);
    otherwise they are the separate `w1` (gate) and `w2` (value) of DINOv3's layout.
    """

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, fused: bool = True) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        else:
            self.w1 = nn.Linear(in_features, hidden_features, bias=bias)
            self.w2 = nn.Linear(in_features, hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, value = self.w12(x).chunk(2, dim=-1)
        else:
            gate, value = self.w1(x), self.w2(x)
        return self.w3(F.silu(gate) * value)
