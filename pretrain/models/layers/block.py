"""One pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

from __future__ import annotations

import torch
from torch import nn

from lvd.pretrain.models.layers.attention import Attention, Rope
from lvd.pretrain.models.layers.drop_path import DropPath
from lvd.pretrain.models.layers.layer_scale import LayerScale
from lvd.pretrain.models.layers.mlp import Mlp
from lvd.pretrain.models.layers.swiglu import SwiGLUFFN, swiglu_hidden_features

# Feed-forward kinds by the names the DINO hubs use; a SwiGLU name gives its hidden-width rounding.
SWIGLU_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}
FFN_LAYERS = ("mlp", *SWIGLU_ALIGN)


def make_ffn(kind: str, dim: int, mlp_ratio: float, bias: bool = True, fused: bool = True) -> nn.Module:
    """`mlp` (GELU) or a `swiglu*` variant; `fused` picks the SwiGLU weight layout (see SwiGLUFFN)."""
    if kind == "mlp":
        return Mlp(dim, int(dim * mlp_ratio), bias=bias)
    if kind in SWIGLU_ALIGN:
        return SwiGLUFFN(dim, swiglu_hidden_features(dim, mlp_ratio, SWIGLU_ALIGN[kind]), bias=bias, fused=fused)
    raise ValueError(f"unknown feed-forward kind {kind!r} (one of {', '.join(FFN_LAYERS)})")


class Block(nn.Module):
    """Attention and feed-forward residual branches, each LayerScale'd (if `init_values`) and drop-path'd."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        init_values: float | None = 1e-5,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        norm_eps: float = 1e-6,
        mask_k_bias: bool = False,
        swiglu_fused: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, mask_k_bias=mask_k_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = make_ffn(ffn_layer, dim, mlp_ratio, bias=ffn_bias, fused=swiglu_fused)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        x = self._add_branch(x, self.attn(self.norm1(x), rope), self.ls1, self.drop_path1)
        return self._add_branch(x, self.mlp(self.norm2(x)), self.ls2, self.drop_path2)

    def _add_branch(self, x: torch.Tensor, branch: torch.Tensor, scale: nn.Module, drop: DropPath) -> torch.Tensor:
        """x + drop(scale(branch)). Where drop-path is idle (eval, or a rate of 0) the LayerScale and
        the residual add are one pass over memory (addcmul): ~5 % of a ViT-S/14 forward at 112 px."""
        if isinstance(scale, LayerScale) and not (self.training and drop.drop_prob > 0):
            return torch.addcmul(x, scale.gamma, branch)
        return x + drop(scale(branch))
