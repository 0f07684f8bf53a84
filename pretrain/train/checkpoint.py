"""lvd training checkpoints and the teacher export.

A checkpoint is a plain dict saved with torch.save and loadable with weights_only=True:
`format` "lvd-pretrain", `arch` {name, overrides}, `teacher_backbone` (DINOv2 hub key layout,
what `build_backbone` and `lvd embed` load: the EMA model's backbone, which is the teacher in
self-distillation and the student's EMA in distillation), `resolution` (the global crop size of
the phase it was written in), and the resume state (student, EMA model as `teacher`, optimiser,
loss centres, iteration, phase, Gram teacher, data-stream positions, config). Files are written to a temporary name
and renamed, so a killed run never leaves a truncated checkpoint that looks finished.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from lvd.common.atomic import atomic_path

FORMAT = "lvd-pretrain"
_NAME = re.compile(r"^iter-(\d+)\.pth$")


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save to `path` via a temporary file in the same folder and os.replace."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def checkpoint_path(folder: str | os.PathLike, iteration: int) -> Path:
    return Path(folder) / f"iter-{iteration:08d}.pth"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(iteration, path) of the finished checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / p) for p in os.listdir(folder) if (m := _NAME.match(p))]
    return sorted(found)


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints."""
    for _, path in list_checkpoints(folder)[: -keep if keep > 0 else None]:
        path.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint without unpickling code (weights_only) and check its format."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} checkpoint")
    return ckpt


def export_teacher(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the teacher backbone of checkpoint `ckpt`: `.safetensors` carries its architecture in
    its metadata (loads with `build_backbone("auto", ...)`), anything else is a plain hub-layout
    state_dict `.pth` (loads wherever DINOv2 hub weights do, given the architecture)."""
    loaded = load_checkpoint(ckpt)
    arch = loaded.get("arch") or {}
    return export_backbone(
        loaded["teacher_backbone"], out, arch.get("name"), arch.get("overrides") or {}, loaded.get("resolution")
    )


# The safetensors metadata key of the global crop size (px) an export finished training at.
RESOLUTION_KEY = "lvd.resolution"


def export_backbone(
    state: dict, out: str | os.PathLike, name: str | None, overrides: dict, resolution: int | None = None
) -> Path:
    """Write a backbone state dict: `.safetensors` with its architecture (and the resolution it
    finished training at) in the metadata, anything else as a plain hub-layout `.pth`."""
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if str(out).endswith(".safetensors"):
        from safetensors.torch import save_file

        from lvd.pretrain.models.weights.lvd_checkpoint import backbone_metadata

        if name is None:
            raise ValueError("a self-describing export needs the architecture name")
        metadata = backbone_metadata(name, overrides)
        if resolution is not None:
            metadata[RESOLUTION_KEY] = str(int(resolution))
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return Path(out)
    return atomic_save(tensors, out)


def export_resolution(path: str | os.PathLike) -> int | None:
    """The global crop size an lvd `.safetensors` export finished training at (None: not recorded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        value = (f.metadata() or {}).get(RESOLUTION_KEY)
    return None if value is None else int(value)
