"""DINOv2 vision transformers, their weight formats, and image embedders."""

from lvd.pretrain.models.build import build_backbone
from lvd.pretrain.models.registry import ModelSpec, get_spec, list_models
from lvd.pretrain.models.vision_transformer import DinoVisionTransformer
from lvd.pretrain.models.weights import WeightsError

__all__ = ["DinoVisionTransformer", "ModelSpec", "WeightsError", "build_backbone", "get_spec", "list_models"]
