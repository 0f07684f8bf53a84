"""The frozen teacher of `mode: distill` (DINOv2 Sec. 5, DINOv3 Sec. 5.2).

DINOv2's released ViT-S/B/L and DINOv3's smaller models are distillations of a large model:
the training loop stays the same, but the targets come from a frozen, larger teacher instead
of the student's own EMA, the student sees its global crops unmasked, and the model kept is a
spare EMA of the student. The targets are the teacher's DINO and iBOT *head* outputs
(Sinkhorn-Knopp normalised), so the teacher is a backbone together with its heads, and the
student's heads must have the same numbers of prototypes.

Where the heads come from: an lvd training checkpoint holds them (its EMA teacher, `teacher`),
and so does a DINO v1 training checkpoint (one DINO head, `teacher.head`). Meta's released
backbones, Hugging Face folders and lvd exports hold none. Heads created at random for such a
file would make the targets a random partition of the teacher's feature space, not the
prototypes it learned, so lvd refuses them with a `HeadlessTeacherError` that says how to fit
heads first: a short run with `model.freeze_backbone: true` trains DINO and iBOT heads on the
frozen backbone with the same losses, and its checkpoint is then a complete teacher.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lvd.common.config import ConfigError
from lvd.common.errors import InputFormatError
from lvd.pretrain.train.ssl import SSLModel

log = logging.getLogger(__name__)

_MLP_LINEAR = re.compile(r"^mlp\.(\d+)\.weight$")


class HeadlessTeacherError(InputFormatError):
    """A distillation teacher file that holds a backbone but no DINO head."""


def teacher_heads(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """The head state dicts a weights file holds: {"dino": ..., "ibot": ...}, each key only where present.

    lvd training checkpoints give both (the EMA teacher's `dino_head.` and `ibot_head.`), DINO v1
    training checkpoints their `head.` as the DINO head; any other file gives none.
    """
    from lvd.pretrain.models.weights import resolve_weights
    from lvd.pretrain.models.weights.dino_checkpoint import is_dino_checkpoint, torch_load
    from lvd.pretrain.models.weights.hub import strip_prefixes
    from lvd.pretrain.models.weights.lvd_checkpoint import is_lvd_checkpoint

    file = resolve_weights(path)
    if file.is_dir() or file.suffix.lower() in (".safetensors", ".onnx"):
        return {}
    try:
        obj = torch_load(str(file))
    except Exception:  # not a torch file: build_backbone has already said what it is
        return {}
    if is_lvd_checkpoint(obj) and isinstance(obj.get("teacher"), dict):
        prefixes = {"dino": "dino_head.", "ibot": "ibot_head."}
        state = obj["teacher"]
    elif is_dino_checkpoint(obj):
        prefixes = {"dino": "head."}
        state = strip_prefixes(obj["teacher"], ("module.",))
    else:
        return {}
    heads = {}
    for name, prefix in prefixes.items():
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            heads[name] = part
    return heads


def head_shape(state: dict[str, torch.Tensor], where: str) -> dict:
    """DINOHead arguments (prototypes, hidden and bottleneck widths, layers) read off a head's tensors."""
    linears = sorted(int(m.group(1)) for k in state if (m := _MLP_LINEAR.match(k)))
    if not linears or "last_layer.weight_v" not in state and "last_layer.weight" not in state:
        raise InputFormatError(f"{where}: not a DINO head (expected mlp.N.weight and last_layer.weight_v)")
    if linears != list(range(0, 2 * len(linears), 2)):
        raise InputFormatError(
            f"{where}: its head's layers {linears} are not the Linear-GELU stack lvd's DINOHead has "
            "(a head with BatchNorm, DINO's --use_bn_in_head, is not supported)"
        )
    prototypes = state.get("last_layer.weight_v", state.get("last_layer.weight"))
    first, last = state[f"mlp.{linears[0]}.weight"], state[f"mlp.{linears[-1]}.weight"]
    return {
        "out_dim": int(prototypes.shape[0]),
        "hidden_dim": int(first.shape[0]) if len(linears) > 1 else int(last.shape[0]),
        "bottleneck_dim": int(last.shape[0]),
        "nlayers": len(linears),
    }


def build_distill_teacher(cfg: DictConfig, settings: dict, student: SSLModel, device: torch.device) -> SSLModel:
    """The frozen teacher named by `distill.teacher`: its backbone and heads, in eval mode on `device`."""
    from lvd.pretrain.models import build_backbone

    d = cfg.distill
    source = str(d.teacher)
    overrides = OmegaConf.to_container(d.teacher_overrides, resolve=True) or {}
    backbone = build_backbone(str(d.teacher_arch), weights=source, **overrides)
    heads = teacher_heads(source)
    if "dino" not in heads:
        raise HeadlessTeacherError(
            f"distill.teacher {source} holds a backbone without DINO/iBOT heads (Meta's released files, Hugging "
            f"Face folders and lvd exports have none): fit heads on it first with `lvd pretrain CONFIG "
            f"model.arch={backbone.arch_name} model.weights={source} model.freeze_backbone=true`, then distil from "
            "that run's RUN/pretrain/checkpoints/iter-*.pth"
        )
    if settings["ibot"] and "ibot" not in heads:
        raise ConfigError(
            f"distill.teacher {source} has a DINO head but no iBOT head (a DINO v1 or mode-dino run): "
            "distil without the patch term, loss.ibot_weight=0"
        )
    dino = head_shape(heads["dino"], f"{source} (DINO head)")
    ibot = head_shape(heads["ibot"], f"{source} (iBOT head)") if settings["ibot"] else None
    _check_compatible(cfg, backbone, student, dino, ibot, source)
    teacher = SSLModel(backbone, dino, ibot)
    teacher.dino_head.load_state_dict(heads["dino"])
    if ibot is not None:
        teacher.ibot_head.load_state_dict(heads["ibot"])
    log.info(
        "distilling from %s (%s, %d-d, heads with %d / %s prototypes)",
        Path(source).name,
        backbone.arch_name,
        backbone.embed_dim,
        dino["out_dim"],
        ibot["out_dim"] if ibot else "no",
    )
    return teacher.requires_grad_(False).to(device).eval()


def _check_compatible(cfg, backbone, student: SSLModel, dino: dict, ibot: dict | None, source: str) -> None:
    """Targets and student outputs must live on the same prototypes and the same patch grid."""
    problems = []
    if dino["out_dim"] != int(cfg.dino_head.prototypes):
        problems.append(f"dino_head.prototypes must be the teacher's {dino['out_dim']}, not {cfg.dino_head.prototypes}")
    if ibot is not None and ibot["out_dim"] != int(cfg.ibot_head.prototypes):
        problems.append(f"ibot_head.prototypes must be the teacher's {ibot['out_dim']}, not {cfg.ibot_head.prototypes}")
    if ibot is not None and int(backbone.patch_size) != int(student.backbone.patch_size):
        problems.append(
            f"the teacher's patch size {backbone.patch_size} differs from the student's {student.backbone.patch_size}: "
            "the iBOT term compares patch by patch"
        )
    if problems:
        raise ConfigError(f"mode distill with teacher {source}: " + "; ".join(problems))
