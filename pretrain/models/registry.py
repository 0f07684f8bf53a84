"""Named backbone architectures and the preprocessing each expects.

Names follow the DINOv2 hub (`dinov2_vits14`, …, `_reg` for 4 register tokens). The hub models
store a 37 x 37 position grid (518 px) but are evaluated at 224 px; `resolution` is that
evaluation size. Tiny sizes exist for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a backbone and feed it pixels."""

    name: str
    arch: MappingProxyType = field(repr=False)  # DinoVisionTransformer keyword arguments
    resolution: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def patch_size(self) -> int:
        return int(self.arch["patch_size"])

    @property
    def embed_dim(self) -> int:
        return int(self.arch["embed_dim"])

    def with_overrides(self, **overrides) -> ModelSpec:
        """The same spec with some architecture arguments replaced (unknown names are errors)."""
        unknown = sorted(set(overrides) - set(_ARCH_KEYS))
        if unknown:
            raise TypeError(f"unknown backbone arguments {unknown}; known: {sorted(_ARCH_KEYS)}")
        return replace(self, arch=MappingProxyType({**self.arch, **overrides}))


_ARCH_KEYS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "ffn_layer",
    "init_values",
    "drop_path_rate",
    "drop_path_uniform",
    "num_register_tokens",
    "interpolate_offset",
    "interpolate_antialias",
    "qkv_bias",
    "proj_bias",
    "ffn_bias",
)

_HUB_SIZES = {
    "s": dict(embed_dim=384, depth=12, num_heads=6, ffn_layer="mlp"),
    "b": dict(embed_dim=768, depth=12, num_heads=12, ffn_layer="mlp"),
    "l": dict(embed_dim=1024, depth=24, num_heads=16, ffn_layer="mlp"),
    "g": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu"),
}


def _hub_spec(size: str, registers: bool) -> ModelSpec:
    arch = dict(img_size=518, patch_size=14, mlp_ratio=4.0, init_values=1e-5, **_HUB_SIZES[size])
    if registers:  # the register models were trained with exact-size, antialiased resampling
        arch.update(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    else:
        arch.update(num_register_tokens=0, interpolate_offset=0.1, interpolate_antialias=False)
    name = f"dinov2_vit{size}14" + ("_reg" if registers else "")
    return ModelSpec(name=name, arch=MappingProxyType(arch), resolution=224)


def _tiny_spec(patch: int, side: int) -> ModelSpec:
    arch = dict(
        img_size=side,
        patch_size=patch,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=4.0,
        ffn_layer="mlp",
        init_values=1e-5,
        num_register_tokens=0,
        interpolate_offset=0.0,
    )
    return ModelSpec(name=f"vit_tiny_p{patch}", arch=MappingProxyType(arch), resolution=side)


def _all_specs() -> dict[str, ModelSpec]:
    specs = [_hub_spec(size, reg) for size in _HUB_SIZES for reg in (False, True)]
    specs += [_tiny_spec(4, 32), _tiny_spec(14, 28)]
    return {spec.name: spec for spec in specs}


def list_models() -> list[str]:
    return sorted(_all_specs())


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; an unknown name is an error listing the known ones."""
    specs = _all_specs()
    if name not in specs:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(specs))}")
    return specs[name]
