"""Projection heads of DINO / iBOT: an MLP to a bottleneck, then weight-normalised prototypes.

The student's and the teacher's copies of a head see the same architecture; DINOv2 keeps the
DINO (image-level) and iBOT (patch-level) heads *separate* ("untied"), so each objective has
its own prototypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormalizedLinear(nn.Module):
    """Linear map whose rows are unit vectors (weight normalisation with the gain fixed to 1).

    Fixing the gain to 1 keeps the logits bounded by the input norm, which is what makes
    freezing/not freezing the last layer a stable choice in DINO.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


def _mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> nn.Sequential:
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> prototype logits (B x K)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3):
        super().__init__()
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, max(1, nlayers))
        self.last_layer = WeightNormalizedLinear(bottleneck_dim, out_dim)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # eps chosen for bf16/fp16 safety (a smaller eps underflows under autocast).
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype != torch.float32 else 1e-12)
        return self.last_layer(x)
