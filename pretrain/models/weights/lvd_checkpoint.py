"""lvd training checkpoints: the teacher backbone, plus the architecture it was trained with."""

from __future__ import annotations

from typing import Any, Mapping

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
