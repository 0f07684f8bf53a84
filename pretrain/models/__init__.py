"""The DINO family's backbones (DINO v1, DINOv2, DINOv3; ViTs, ConvNeXts, ResNet-50), their
weight formats, and image embedders."""

from lvd.pretrain.models.build import build_backbone
from lvd.pretrain.models.convnext import ConvNeXt
from lvd.pretrain.models.registry import ModelSpec, UnknownModelError, get_spec, list_models
from lvd.pretrain.models.resnet import ResNet
from lvd.pretrain.models.vision_transformer import DinoVisionTransformer
from lvd.pretrain.models.weights import WeightsError

__all__ = [
    "ConvNeXt",
    "DinoVisionTransformer",
    "ModelSpec",
    "ResNet",
    "UnknownModelError",
    "WeightsError",
    "build_backbone",
    "get_spec",
    "list_models",
]
