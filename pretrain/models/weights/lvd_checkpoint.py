"""lvd training checkpoints: the teacher backbone, plus the architecture it was trained with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LVD_FORMAT = "lvd-pretrain"


def is_lvd_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == LVD_FORMAT


def teacher_from_checkpoint(ckpt: Mapping) -> tuple[dict, str | None, dict]:
    """(teacher state dict, architecture name, architecture overrides) of a training checkpoint.

    The teacher (the EMA of the student) is the network DINOv2 evaluates and releases.
    """
    if "teacher_backbone" not in ckpt:
        raise KeyError("lvd checkpoint has no 'teacher_backbone' entry")
    arch = ckpt.get("arch") or {}
    return dict(ckpt["teacher_backbone"]), arch.get("name"), dict(arch.get("overrides") or {})


# A backbone exported by lvd: safetensors (no pickle) whose metadata names the architecture, so
# `build_backbone("auto", weights=FILE)` and `embed.model: auto` need no overrides. The hub-layout
# tensors are unchanged, so the file also loads wherever a DINOv2 safetensors file does.
BACKBONE_ARCH_KEY = "lvd.arch"
BACKBONE_OVERRIDES_KEY = "lvd.overrides"
BACKBONE_FAMILY_KEY = "lvd.family"  # dino | dinov2 | dinov3, and the kind (vit | convnext | resnet)
BACKBONE_KIND_KEY = "lvd.kind"


def backbone_metadata(name: str, overrides: Mapping) -> dict[str, str]:
    """The safetensors metadata of an exported backbone: registry name, family, kind, overrides."""
    import json

    from lvd.pretrain.models.registry import get_spec

    spec = get_spec(name)
    return {
        BACKBONE_ARCH_KEY: str(name),
        BACKBONE_FAMILY_KEY: spec.family,
        BACKBONE_KIND_KEY: spec.kind,
        BACKBONE_OVERRIDES_KEY: json.dumps(dict(overrides), sort_keys=True),
    }


def arch_from_metadata(metadata: Mapping[str, str] | None) -> tuple[str | None, dict]:
    """(architecture name, overrides) recorded in a safetensors file's metadata, or (None, {})."""
    import json

    if not metadata or BACKBONE_ARCH_KEY not in metadata:
        return None, {}
    name = metadata[BACKBONE_ARCH_KEY]
    family = metadata.get(BACKBONE_FAMILY_KEY)
    if family is not None:
        from lvd.pretrain.models.registry import get_spec
        from lvd.pretrain.models.weights.strict import WeightsError

        if get_spec(name).family != family:
            raise WeightsError(
                f"the export says {name} is a {family} backbone; lvd's {name} is {get_spec(name).family}"
            )
    return name, dict(json.loads(metadata.get(BACKBONE_OVERRIDES_KEY) or "{}"))
