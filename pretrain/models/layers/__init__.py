"""Small composable pieces of the DINO vision transformers."""

from lvd.pretrain.models.layers.attention import Attention, MaskedKeyBiasLinear
from lvd.pretrain.models.layers.block import FFN_LAYERS, Block, make_ffn
from lvd.pretrain.models.layers.drop_path import DropPath, drop_path
from lvd.pretrain.models.layers.layer_scale import LayerScale
from lvd.pretrain.models.layers.mlp import Mlp
from lvd.pretrain.models.layers.patch_embed import PatchEmbed
from lvd.pretrain.models.layers.rope import RopePositionEmbedding, apply_rope, rope_periods
from lvd.pretrain.models.layers.swiglu import SwiGLUFFN, swiglu_hidden_features

__all__ = [
    "FFN_LAYERS",
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "MaskedKeyBiasLinear",
    "Mlp",
    "PatchEmbed",
    "RopePositionEmbedding",
    "SwiGLUFFN",
    "apply_rope",
    "drop_path",
    "make_ffn",
    "rope_periods",
    "swiglu_hidden_features",
]
