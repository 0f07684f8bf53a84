"""Small composable pieces of the DINOv2 vision transformer."""

from lvd.pretrain.models.layers.attention import Attention
from lvd.pretrain.models.layers.block import Block, LayerNorm, make_ffn
from lvd.pretrain.models.layers.drop_path import DropPath, drop_path
from lvd.pretrain.models.layers.layer_scale import LayerScale
from lvd.pretrain.models.layers.mlp import Mlp
from lvd.pretrain.models.layers.patch_embed import PatchEmbed
from lvd.pretrain.models.layers.swiglu import SwiGLUFFN, swiglu_hidden_features

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
