"""Small composable pieces of the DINOv2 vision transformer."""

from .attention import Attention
from .block import Block, LayerNorm, make_ffn
from .drop_path import DropPath, drop_path
from .layer_scale import LayerScale
from .mlp import Mlp
from .patch_embed import PatchEmbed
from .swiglu import SwiGLUFFN, swiglu_hidden_features

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerNorm",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFN",
    "drop_path",
    "make_ffn",
    "swiglu_hidden_features",
]
