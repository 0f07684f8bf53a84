"""Read backbone weights from every supported local format into the family's hub layout.

Formats: a hub `.pth` state dict, exactly as Meta publishes it (DINO v1, DINOv2, DINOv3); a
DINO v1 training checkpoint (its teacher); a Hugging Face folder or `model.safetensors`
(`ViTModel` for DINO v1, `Dinov2Model`, `DINOv3ViTModel`, `DINOv3ConvNextModel`); an lvd
training checkpoint (teacher backbone) or export; a torch.onnx export of a Hugging Face
Dinov2Model. `load_weights` returns the tensors and the architecture facts the file implies (its
stored position grid, how it resamples position embeddings, which architecture it is), which
`build_backbone` applies before strict loading.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lvd.pretrain.models.weights.dino_checkpoint import arch_from_args, is_dino_checkpoint, teacher_backbone, torch_load
from lvd.pretrain.models.weights.hf_common import read_hf_config
from lvd.pretrain.models.weights.hf_layouts import from_huggingface, looks_like_hf
from lvd.pretrain.models.weights.hub import grid_side, to_hub_layout
from lvd.pretrain.models.weights.lvd_checkpoint import arch_from_metadata, is_lvd_checkpoint, teacher_from_checkpoint
from lvd.pretrain.models.weights.release_names import name_from_release_file
from lvd.pretrain.models.weights.resolve import resolve_weights
from lvd.pretrain.models.weights.strict import WeightsError, check_state_dict, load_strict

log = logging.getLogger(__name__)

__all__ = [
    "LoadedWeights",
    "WeightsError",
    "check_state_dict",
    "load_strict",
    "load_weights",
    "weights_arch_name",
    "resolve_weights",
]


@dataclass
class LoadedWeights:
    state_dict: dict[str, torch.Tensor]
    source: str  # resolved path
    format: str  # hub | dino-checkpoint | huggingface | lvd-pretrain | lvd-backbone | onnx
    hints: dict = field(default_factory=dict)  # architecture arguments implied by the file
    arch_name: str | None = None  # the architecture the file says it is, when it says
    suggested: tuple[str, dict] | None = None  # (name, overrides) the file's content or name implies


FORMATS_HINT = (
    "lvd reads hub .pth state dicts, DINO and lvd checkpoints, .safetensors, Hugging Face folders and .onnx exports"
)


def _read_safetensors(path: Path, with_metadata: bool = False):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise WeightsError(f"{path} is not a readable safetensors file ({type(exc).__name__}); {FORMATS_HINT}") from exc
    return (tensors, metadata) if with_metadata else tensors


def _from_huggingface(sd: dict, config: dict, source: Path) -> LoadedWeights:
    from lvd.pretrain.models.registry import closest_spec

    converted = from_huggingface(sd, config)
    suggested = closest_spec(converted.family, converted.kind, converted.facts) if converted.facts else None
    return LoadedWeights(converted.state_dict, str(source), "huggingface", converted.hints, suggested=suggested)


def _read_folder(path: Path) -> LoadedWeights:
    files = sorted(path.glob("*.safetensors"))  # one model.safetensors, or its shards
    if not files:
        raise WeightsError(f"{path}: a Hugging Face folder needs model.safetensors (pickled .bin files are not read)")
    merged: dict[str, torch.Tensor] = {}
    for file in files:
        merged.update(_read_safetensors(file))
    return _from_huggingface(merged, read_hf_config(path), path)


def _read_onnx(path: Path) -> LoadedWeights:
    from lvd.pretrain.models.weights.onnx_import import state_dict_from_onnx

    hints = {"interpolate_offset": 0.0, "interpolate_antialias": False}  # a Dinov2Model export
    try:
        sd = state_dict_from_onnx(path)
    except WeightsError:
        raise
    except Exception as exc:  # onnx raises protobuf errors for a damaged file
        raise WeightsError(f"{path} is not a readable ONNX export ({type(exc).__name__}); {FORMATS_HINT}") from exc
    return LoadedWeights(sd, str(path), "onnx", hints)


def _read_pth(path: Path) -> LoadedWeights:
    try:
        obj = torch_load(str(path))
    except Exception as exc:
        # torch's own message suggests weights_only=False, which would run code from an untrusted file
        raise WeightsError(f"{path} is not a readable weights file ({type(exc).__name__}); {FORMATS_HINT}") from exc
    if is_lvd_checkpoint(obj):
        sd, name, overrides = teacher_from_checkpoint(obj)
        return LoadedWeights(to_hub_layout(sd), str(path), "lvd-pretrain", dict(overrides), name)
    if is_dino_checkpoint(obj):
        name = arch_from_args(obj)
        return LoadedWeights(
            teacher_backbone(obj), str(path), "dino-checkpoint", suggested=(name, {}) if name else None
        )
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict of tensors nor an lvd or DINO checkpoint")
    if looks_like_hf(obj):
        return _from_huggingface(obj, {}, path)
    return LoadedWeights(to_hub_layout(obj), str(path), "hub")


def _read(path: Path) -> LoadedWeights:
    if path.is_dir():
        return _read_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _read_onnx(path)
    if suffix == ".safetensors":
        sd, metadata = _read_safetensors(path, with_metadata=True)
        name, overrides = arch_from_metadata(metadata)
        if name is not None:
            return LoadedWeights(to_hub_layout(sd), str(path), "lvd-backbone", overrides, name)
        if looks_like_hf(sd):
            return _from_huggingface(sd, read_hf_config(path.parent), path)
        return LoadedWeights(to_hub_layout(sd), str(path), "hub")
    return _read_pth(path)


def weights_arch_name(spec: str | os.PathLike) -> str | None:
    """The architecture a weights file names, or None: lvd exports and checkpoints (their metadata),
    Hugging Face folders (config.json), files under Meta's release names, DINO checkpoints (args).

    A safetensors file answers from its header, a folder from its config, a release name from
    the name alone; other files are read whole.
    """
    path = resolve_weights(spec)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                name = arch_from_metadata(f.metadata())[0]
        except Exception as exc:  # a damaged header
            raise WeightsError(
                f"{path} is not a readable safetensors file ({type(exc).__name__}); {FORMATS_HINT}"
            ) from exc
        if name is not None:
            return name
    elif path.is_file() and (name := name_from_release_file(path)) is not None:
        return name
    loaded = load_weights(spec)
    return loaded.arch_name or (loaded.suggested[0] if loaded.suggested else None)


def load_weights(spec: str | os.PathLike, patch_size: int | None = None) -> LoadedWeights:
    """Resolve `spec` (path or pkg://) and read it; `patch_size` lets the stored grid set img_size."""
    path = resolve_weights(spec)
    loaded = _read(path)
    sd = loaded.state_dict
    side = grid_side(sd)
    patch = sd.get("patch_embed.proj.weight")
    if side is not None and patch is not None:
        loaded.hints.setdefault("img_size", side * int(patch.shape[-1]))
    if "local_cls_norm.weight" in sd:  # DINOv3 7B and satellite files
        loaded.hints.setdefault("local_cls_norm", True)
    if loaded.arch_name is None and loaded.suggested is None and path.is_file():
        name = name_from_release_file(path)
        loaded.suggested = (name, {}) if name else None
    log.info("read %s weights from %s (%d tensors)", loaded.format, path, len(sd))
    return loaded
