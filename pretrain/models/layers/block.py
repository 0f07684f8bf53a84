"""One pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from lvd.pretrain.models.layers.attention import Attention
from lvd.pretrain.models.layers.drop_path import DropPath
from lvd.pretrain.models.layers.layer_scale import LayerScale
from lvd.pretrain.models.layers.mlp import Mlp
from lvd.pretrain.models.layers.swiglu import SwiGLUFFN, swiglu_hidden_features

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def make_ffn(kind: str, dim: int, mlp_ratio: float, bias: bool = True) -> nn.Module:
    """`mlp` (GELU, ViT-S/B/L) or `swiglu` (ViT-g)."""
    if kind == "mlp":
        return Mlp(dim, int(dim * mlp_ratio), bias=bias)
    if kind == "swiglu":
        return SwiGLUFFN(dim, swiglu_hidden_features(dim, mlp_ratio), bias=bias)
    raise ValueError(f"unknown feed-forward kind {kind!r} (mlp or swiglu)")


class Block(nn.Module):
    """Attention and feed-forward residual branches, each LayerScale'd and drop-path'd."""

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
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = LayerNorm(dim)
        self.mlp = make_ffn(ffn_layer, dim, mlp_ratio, bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
