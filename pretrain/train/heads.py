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
    """Prototype layer: row k of the weight is `weight_g[k] * weight_v[k] / |weight_v[k]|`.

    Weight normalisation as `torch.nn.utils.weight_norm` stores it (`weight_g` K x 1, `weight_v`
    K x D), so dinov2's head state dicts load as they are. The gain starts at 1 and trains, as
    in dinov2; `freeze_gain` keeps it at 1 (DINO v1's `norm_last_layer`), which bounds the logits
    by the input norm. A state dict of an older lvd head (`weight` alone) loads with gain 1.
    """

    def __init__(self, in_dim: int, out_dim: int, freeze_gain: bool = False, device=None):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim, device=device))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1, device=device), requires_grad=not freeze_gain)
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Other layouts of the same two tensors: torch's parametrized weight_norm, and lvd heads
        # from before the gain was a parameter (gain 1).
        renames = {
            "parametrizations.weight.original0": "weight_g",
            "parametrizations.weight.original1": "weight_v",
            "weight": "weight_v",
        }
        for old, new in renames.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        if prefix + "weight_v" in state_dict and prefix + "weight_g" not in state_dict:
            v = state_dict[prefix + "weight_v"]
            state_dict[prefix + "weight_g"] = torch.ones(v.shape[0], 1, dtype=v.dtype, device=v.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> nn.Sequential:
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> prototype logits (B x K).

    `norm_last_layer` freezes the prototypes' gain at 1 (DINO v1's option; dinov2 trains it).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = False,
    ):
        super().__init__()
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, max(1, nlayers))
        self.last_layer = WeightNormalizedLinear(bottleneck_dim, out_dim, freeze_gain=norm_last_layer)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # eps chosen for bf16/fp16 safety (a smaller eps underflows under autocast).
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype != torch.float32 else 1e-12)
        return self.last_layer(x)
