"""DINOv2 vision transformers, their weight formats, and image embedders."""

from .build import build_backbone
from .registry import ModelSpec, get_spec, list_models
from .vision_transformer import DinoVisionTransformer
from .weights import WeightsError

__all__ = ["DinoVisionTransformer", "ModelSpec", "WeightsError", "build_backbone", "get_spec", "list_models"]
