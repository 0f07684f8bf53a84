"""Named backbone architectures and the preprocessing each expects.

Names follow Meta's hubs: DINO v1 (`dino_vits16`, `dino_vits8`, `dino_vitb16`, `dino_vitb8`,
`dino_resnet50`), DINOv2 (`dinov2_vits14`, …, `_reg` for 4 register tokens) and DINOv3
(`dinov3_vits16` … `dinov3_vit7b16`, `dinov3_convnext_tiny` … `_large`; `_sat493m` for the
satellite-imagery weights, which expect their own normalisation). Each entry records the file
name Meta releases its weights under and where they come from; lvd never downloads them.
`resolution` is the evaluation size (the DINOv2 hub models store a 518 px position grid but
are evaluated at 224 px). Tiny sizes of every kind exist for tests.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from lvd.common.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINOv3's satellite models (SAT-493M): statistics of their training imagery (Meta's README)
SAT493M_MEAN = (0.430, 0.411, 0.296)
SAT493M_STD = (0.213, 0.156, 0.143)

FAMILIES = ("dino", "dinov2", "dinov3")
KINDS = ("vit", "convnext", "resnet")
CONVNET_STRIDE = 32  # the "patch" of a ConvNet: pixels per cell of its last feature map

_DINO_URL = "https://dl.fbaipublicfiles.com/dino"
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"
_DINOV3_SOURCE = (
    "Meta, under the DINOv3 License, on request: ai.meta.com/resources/models-and-libraries/dinov3-downloads"
)


class UnknownModelError(UserError, KeyError):
    """A model name the registry does not know (the message lists the known ones)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def backbone_class(kind: str) -> type:
    """The module class that builds a `kind` of backbone."""
    if kind == "vit":
        from lvd.pretrain.models.vision_transformer import DinoVisionTransformer

        return DinoVisionTransformer
    if kind == "convnext":
        from lvd.pretrain.models.convnext import ConvNeXt

        return ConvNeXt
    if kind == "resnet":
        from lvd.pretrain.models.resnet import ResNet

        return ResNet
    raise ValueError(f"unknown backbone kind {kind!r}; known: {KINDS}")


def arch_keys(kind: str) -> tuple[str, ...]:
    """The architecture arguments a `kind` of backbone accepts (its constructor's)."""
    return tuple(inspect.signature(backbone_class(kind)).parameters)


def arch_defaults(kind: str) -> dict:
    return {k: p.default for k, p in inspect.signature(backbone_class(kind)).parameters.items()}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a backbone and feed it pixels, and where its weights come from."""

    name: str
    arch: MappingProxyType = field(repr=False)  # keyword arguments of backbone_class(kind)
    resolution: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    family: str = "dinov2"  # dino | dinov2 | dinov3
    kind: str = "vit"  # vit | convnext | resnet
    weights_file: str | None = None  # the file name Meta releases the weights under
    weights_source: str | None = None  # where that file comes from

    @property
    def patch_size(self) -> int:
        """Pixels per token side: the ViT's patch, a ConvNet's last-map stride (32)."""
        return int(self.arch["patch_size"]) if self.kind == "vit" else CONVNET_STRIDE

    @property
    def embed_dim(self) -> int:
        if self.kind == "vit":
            return int(self.arch["embed_dim"])
        if self.kind == "convnext":
            return int(self.arch["dims"][-1])
        return int(self.arch.get("width", 64)) * 8 * 4  # the last ResNet stage: 8 x width planes, x4 expansion

    @property
    def is_convnet(self) -> bool:
        return self.kind != "vit"

    def accepts(self, key: str) -> bool:
        return key in arch_keys(self.kind)

    def with_overrides(self, **overrides) -> ModelSpec:
        """The same spec with some architecture arguments replaced (unknown names are errors)."""
        known = arch_keys(self.kind)
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise TypeError(f"unknown {self.kind} backbone arguments {unknown}; known: {sorted(known)}")
        return replace(self, arch=MappingProxyType({**self.arch, **overrides}))


def _spec(name: str, arch: dict, resolution: int = 224, **fields) -> ModelSpec:
    return ModelSpec(name=name, arch=MappingProxyType(arch), resolution=resolution, **fields)


# -- DINOv2 ---------------------------------------------------------------------------------

_DINOV2_SIZES = {
    "s": dict(embed_dim=384, depth=12, num_heads=6, ffn_layer="mlp"),
    "b": dict(embed_dim=768, depth=12, num_heads=12, ffn_layer="mlp"),
    "l": dict(embed_dim=1024, depth=24, num_heads=16, ffn_layer="mlp"),
    "g": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu"),
}


def _dinov2_spec(size: str, registers: bool) -> ModelSpec:
    arch = dict(img_size=518, patch_size=14, mlp_ratio=4.0, init_values=1e-5, **_DINOV2_SIZES[size])
    if registers:  # the register models were trained with exact-size, antialiased resampling
        arch.update(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    else:
        arch.update(num_register_tokens=0, interpolate_offset=0.1, interpolate_antialias=False)
    name = f"dinov2_vit{size}14" + ("_reg" if registers else "")
    file = f"dinov2_vit{size}14{'_reg4' if registers else ''}_pretrain.pth"
    source = f"{_DINOV2_URL}/dinov2_vit{size}14/{file} (Apache-2.0)"
    return _spec(name, arch, family="dinov2", weights_file=file, weights_source=source)


# -- DINO v1 --------------------------------------------------------------------------------

_DINO_VIT = dict(
    img_size=224,
    mlp_ratio=4.0,
    ffn_layer="mlp",
    init_values=None,  # no LayerScale
    num_register_tokens=0,
    interpolate_offset=0.1,  # DINO's resampling: scale factor (new + 0.1) / old, bicubic
    interpolate_antialias=False,
    mask_token=False,
    crop_remainder=True,
    token_init_std=0.02,
)
_DINO_FILES = {"s16": "deitsmall16", "s8": "deitsmall8", "b16": "vitbase16", "b8": "vitbase8"}


def _dino_vit_spec(size: str, patch: int) -> ModelSpec:
    dims = dict(embed_dim=384, depth=12, num_heads=6) if size == "s" else dict(embed_dim=768, depth=12, num_heads=12)
    stem = f"dino_{_DINO_FILES[f'{size}{patch}']}_pretrain"
    return _spec(
        f"dino_vit{size}{patch}",
        {**_DINO_VIT, **dims, "patch_size": patch},
        family="dino",
        weights_file=f"{stem}.pth",
        weights_source=f"{_DINO_URL}/{stem}/{stem}.pth (Apache-2.0); Hugging Face facebook/dino-vit{size}{patch}",
    )


def _dino_resnet50() -> ModelSpec:
    return _spec(
        "dino_resnet50",
        dict(layers=(3, 4, 6, 3), width=64),
        family="dino",
        kind="resnet",
        weights_file="dino_resnet50_pretrain.pth",
        weights_source=f"{_DINO_URL}/dino_resnet50_pretrain/dino_resnet50_pretrain.pth (Apache-2.0)",
    )


# -- DINOv3 ---------------------------------------------------------------------------------

_DINOV3_VIT = dict(
    img_size=224,
    patch_size=16,
    init_values=1e-5,
    num_register_tokens=4,
    register_key="storage_tokens",
    position_encoding="rope",
    rope_base=100.0,
    rope_rescale=2.0,  # training-time coordinate rescaling, as DINOv3 trains; none at evaluation
    norm_eps=1e-5,
    mask_k_bias=True,
    swiglu_fused=False,
    crop_remainder=True,
    token_init_std=0.02,
    drop_path_uniform=True,
    interpolate_offset=0.0,
)
# name: (embed_dim, depth, heads, ffn_layer, mlp_ratio, qkv_bias, hash of the LVD-1689M file)
_DINOV3_VITS = {
    "vits16": (384, 12, 6, "mlp", 4.0, True, "08c60483"),
    "vits16plus": (384, 12, 6, "swiglu", 6.0, True, "4057cbaa"),
    "vitb16": (768, 12, 12, "mlp", 4.0, True, "73cec8be"),
    "vitl16": (1024, 24, 16, "mlp", 4.0, True, "8aa4cbdd"),
    "vitl16plus": (1024, 24, 16, "swiglu", 6.0, True, "46503df0"),
    "vith16plus": (1280, 32, 20, "swiglu", 6.0, True, "7c1da9a5"),
    "vit7b16": (4096, 40, 32, "swiglu64", 3.0, False, "a955f4ea"),
}
_DINOV3_SAT = {"vitl16": "eadcf0ff", "vit7b16": "a6675841"}  # satellite (SAT-493M) weights
_DINOV3_CONVNEXTS = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768), "21b726bb"),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768), "296db49d"),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024), "801f2ba9"),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536), "61fa432d"),
}


def _dinov3_vit_specs(arch: str) -> list[ModelSpec]:
    dim, depth, heads, ffn, ratio, qkv_bias, lvd_hash = _DINOV3_VITS[arch]
    base = dict(_DINOV3_VIT, embed_dim=dim, depth=depth, num_heads=heads, ffn_layer=ffn, mlp_ratio=ratio)
    base["qkv_bias"] = qkv_bias
    hf = "" if arch == "vitl16plus" else f"; Hugging Face facebook/dinov3-{arch}-pretrain-lvd1689m"
    specs = [
        _spec(
            f"dinov3_{arch}",
            {**base, "local_cls_norm": arch == "vit7b16"},
            family="dinov3",
            weights_file=f"dinov3_{arch}_pretrain_lvd1689m-{lvd_hash}.pth",
            weights_source=_DINOV3_SOURCE + hf,
        )
    ]
    if arch in _DINOV3_SAT:
        specs.append(
            _spec(
                f"dinov3_{arch}_sat493m",
                {**base, "local_cls_norm": True},
                family="dinov3",
                mean=SAT493M_MEAN,
                std=SAT493M_STD,
                weights_file=f"dinov3_{arch}_pretrain_sat493m-{_DINOV3_SAT[arch]}.pth",
                weights_source=_DINOV3_SOURCE + f"; Hugging Face facebook/dinov3-{arch}-pretrain-sat493m",
            )
        )
    return specs


def _dinov3_convnext_spec(size: str) -> ModelSpec:
    depths, dims, digest = _DINOV3_CONVNEXTS[size]
    return _spec(
        f"dinov3_convnext_{size}",
        dict(depths=depths, dims=dims),
        family="dinov3",
        kind="convnext",
        weights_file=f"dinov3_convnext_{size}_pretrain_lvd1689m-{digest}.pth",
        weights_source=_DINOV3_SOURCE + f"; Hugging Face facebook/dinov3-convnext-{size}-pretrain-lvd1689m",
    )


# -- tiny sizes for tests -------------------------------------------------------------------


def _tiny_specs() -> list[ModelSpec]:
    tiny = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, ffn_layer="mlp")

    def dinov2(patch: int, side: int) -> ModelSpec:
        arch = dict(tiny, img_size=side, patch_size=patch, init_values=1e-5, num_register_tokens=0)
        return _spec(f"vit_tiny_p{patch}", {**arch, "interpolate_offset": 0.0}, side, family="dinov2")

    return [
        dinov2(4, 32),
        dinov2(14, 28),
        _spec("dino_vit_tiny_p4", {**_DINO_VIT, **tiny, "img_size": 32, "patch_size": 4}, 32, family="dino"),
        _spec("dinov3_vit_tiny_p4", {**_DINOV3_VIT, **tiny, "img_size": 32, "patch_size": 4}, 32, family="dinov3"),
        _spec(
            "dinov3_convnext_mini",
            dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64)),
            64,
            family="dinov3",
            kind="convnext",
        ),
        _spec("dino_resnet_mini", dict(layers=(1, 1, 1, 1), width=8), 64, family="dino", kind="resnet"),
    ]


def _all_specs() -> dict[str, ModelSpec]:
    specs = [_dino_vit_spec(size, patch) for size in "sb" for patch in (16, 8)] + [_dino_resnet50()]
    specs += [_dinov2_spec(size, reg) for size in _DINOV2_SIZES for reg in (False, True)]
    specs += [spec for arch in _DINOV3_VITS for spec in _dinov3_vit_specs(arch)]
    specs += [_dinov3_convnext_spec(size) for size in _DINOV3_CONVNEXTS]
    specs += _tiny_specs()
    return {spec.name: spec for spec in specs}


def _ffn_signature(arch: dict) -> tuple[bool, int]:
    """(gated, hidden width) of a ViT's feed-forward layers: what its weights' shapes show."""
    from lvd.pretrain.models.layers.block import SWIGLU_ALIGN
    from lvd.pretrain.models.layers.swiglu import swiglu_hidden_features

    kind, dim, ratio = arch["ffn_layer"], int(arch["embed_dim"]), float(arch["mlp_ratio"])
    if kind == "mlp":
        return False, int(dim * ratio)
    return True, swiglu_hidden_features(dim, ratio, SWIGLU_ALIGN[kind])


def swiglu_ratio(dim: int, hidden: int) -> tuple[str, float]:
    """The SwiGLU kind and ratio whose hidden width is `hidden` (width x ratio x 2/3, rounded up)."""
    from lvd.pretrain.models.layers.block import SWIGLU_ALIGN
    from lvd.pretrain.models.layers.swiglu import swiglu_hidden_features

    ratio = hidden * 1.5 / dim
    for name, align in SWIGLU_ALIGN.items():
        if swiglu_hidden_features(dim, ratio, align) == hidden:
            return name, ratio
    raise ValueError(f"no SwiGLU variant of width {dim} has a hidden width of {hidden}")


def closest_spec(family: str, kind: str, facts: dict) -> tuple[str, dict]:
    """(name, overrides): the registry entry of `family`/`kind` whose architecture has `facts`, or
    the family's first entry with the differing facts as overrides. Feed-forward layers count
    as equal when their shapes are (a SwiGLU rounded to 8 or to 64 can have the same width)."""
    candidates = [s for s in _all_specs().values() if s.family == family and s.kind == kind]
    if not candidates:
        raise ValueError(f"the registry has no {family} {kind}")
    ffn_keys = ("ffn_layer", "mlp_ratio")

    def differing(spec: ModelSpec) -> dict:
        arch = {**arch_defaults(kind), **spec.arch}
        out = {k: v for k, v in facts.items() if k not in ffn_keys and arch.get(k) != v}
        if kind == "vit" and "ffn_layer" in facts and _ffn_signature({**arch, **facts}) != _ffn_signature(arch):
            out.update({k: facts[k] for k in ffn_keys})
        return out

    for spec in candidates:
        if not differing(spec):
            return spec.name, {}
    return candidates[0].name, differing(candidates[0])


def list_models() -> list[str]:
    return sorted(_all_specs())


def all_specs() -> list[ModelSpec]:
    """Every registry entry, in the registry's order (families, then sizes, then test sizes)."""
    return list(_all_specs().values())


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; an unknown name is an error listing the known ones."""
    specs = _all_specs()
    if name not in specs:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(sorted(specs))}")
    return specs[name]
