"""Read backbone weights from every supported local format into the DINOv2 hub layout.

Formats: a hub `.pth` state dict; a Hugging Face folder or `model.safetensors`; an lvd
training checkpoint (teacher backbone); a torch.onnx export of a Hugging Face Dinov2Model.
`load_weights` returns the tensors and the architecture facts the file implies (its stored
position grid, how it resamples position embeddings), which `build_backbone` applies before
strict loading.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lvd.pretrain.models.weights.hub import grid_side, to_hub_layout
from lvd.pretrain.models.weights.huggingface import hf_to_hub, hints_from_hf_config, looks_like_hf, read_hf_config
from lvd.pretrain.models.weights.lvd_checkpoint import arch_from_metadata, is_lvd_checkpoint, teacher_from_checkpoint
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
    format: str  # hub | huggingface | lvd-pretrain | onnx
    hints: dict = field(default_factory=dict)  # architecture arguments implied by the file
    arch_name: str | None = None  # the architecture the file says it is, when it says
    suggested: tuple[str, dict] | None = None  # (name, overrides) the file's content or name implies


FORMATS_HINT = "lvd reads hub .pth state dicts, lvd checkpoints, .safetensors, Hugging Face folders and .onnx exports"


def _read_safetensors(path: Path, with_metadata: bool = False):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise WeightsError(f"{path} is not a readable safetensors file ({type(exc).__name__}); {FORMATS_HINT}") from exc
    return (tensors, metadata) if with_metadata else tensors


def _from_huggingface(sd: dict, config: dict) -> tuple[dict, dict]:
    hub = hf_to_hub(sd)
    with_registers = "register_tokens" in hub or config.get("model_type") == "dinov2_with_registers"
    # Hugging Face resamples position embeddings to the exact grid (antialiased with registers)
    hints = {"interpolate_offset": 0.0, "interpolate_antialias": bool(with_registers)}
    hints.update(hints_from_hf_config(config))
    return hub, hints


def _read(path: Path) -> LoadedWeights:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))  # one model.safetensors, or its shards
        if not files:
            raise WeightsError(
                f"{path}: a Hugging Face folder needs model.safetensors (pickled .bin files are not read)"
            )
        merged: dict[str, torch.Tensor] = {}
        for file in files:
            merged.update(_read_safetensors(file))
        sd, hints = _from_huggingface(merged, read_hf_config(path))
        return LoadedWeights(sd, str(path), "huggingface", hints)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from lvd.pretrain.models.weights.onnx_import import state_dict_from_onnx

        hints = {"interpolate_offset": 0.0, "interpolate_antialias": False}  # a Dinov2Model export
        try:
            sd = state_dict_from_onnx(path)
        except WeightsError:
            raise
        except Exception as exc:  # onnx raises protobuf errors for a damaged file
            raise WeightsError(f"{path} is not a readable ONNX export ({type(exc).__name__}); {FORMATS_HINT}") from exc
        return LoadedWeights(sd, str(path), "onnx", hints)
    if suffix == ".safetensors":
        sd, metadata = _read_safetensors(path, with_metadata=True)
        name, overrides = arch_from_metadata(metadata)
        if name is not None:
            return LoadedWeights(to_hub_layout(sd), str(path), "lvd-backbone", overrides, name)
        if looks_like_hf(sd):
            sd, hints = _from_huggingface(sd, read_hf_config(path.parent))
            return LoadedWeights(sd, str(path), "huggingface", hints)
        return LoadedWeights(to_hub_layout(sd), str(path), "hub")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message suggests weights_only=False, which would run code from an untrusted file
        raise WeightsError(f"{path} is not a readable weights file ({type(exc).__name__}); {FORMATS_HINT}") from exc
    if is_lvd_checkpoint(obj):
        sd, name, overrides = teacher_from_checkpoint(obj)
        return LoadedWeights(to_hub_layout(sd), str(path), "lvd-pretrain", dict(overrides), name)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict of tensors nor an lvd checkpoint")
    if looks_like_hf(obj):
        sd, hints = _from_huggingface(obj, {})
        return LoadedWeights(sd, str(path), "huggingface", hints)
    return LoadedWeights(to_hub_layout(obj), str(path), "hub")


def weights_arch_name(spec: str | os.PathLike) -> str | None:
    """The architecture a weights file records (lvd exports and checkpoints), or None.

    A safetensors file answers from its header alone; other formats are read whole.
    """
    path = resolve_weights(spec)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return arch_from_metadata(f.metadata())[0]
        except Exception as exc:  # a damaged header
            raise WeightsError(
                f"{path} is not a readable safetensors file ({type(exc).__name__}); {FORMATS_HINT}"
            ) from exc
    return load_weights(spec).arch_name


def load_weights(spec: str | os.PathLike, patch_size: int | None = None) -> LoadedWeights:
    """Resolve `spec` (path or pkg://) and read it; `patch_size` lets the stored grid set img_size."""
    path = resolve_weights(spec)
    loaded = _read(path)
    side = grid_side(loaded.state_dict)
    patch = loaded.state_dict.get("patch_embed.proj.weight")
    if side is not None and patch is not None:
        loaded.hints.setdefault("img_size", side * int(patch.shape[-1]))
    log.info("read %s weights from %s (%d tensors)", loaded.format, path, len(loaded.state_dict))
    return loaded
