"""The pretrain configuration: defaults from configs/pretrain.yaml, file and `a.b=v` overrides.

`lvd pretrain CONFIG [k=v]` does the same merge; this loader serves
scripts, tests and benchmarks that call `run_pretrain` directly.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from lvd.common.config import ConfigError, merge_config, packaged_config_path
from lvd.common.config_checks import boolean, choice, config_problems, integer, number
from lvd.pretrain.train.schedules import SCALING_RULES


def _registry_model(value) -> str | None:
    from lvd.pretrain.models.registry import list_models

    names = list_models()
    return None if value in names else f"must name a registry model ({', '.join(names)}), got {value!r}"


def _pair(lo: float, hi: float):
    def check(value):
        try:
            a, b = (float(v) for v in value)
        except (TypeError, ValueError):
            return f"must be a pair of numbers, got {value!r}"
        return None if lo <= a <= b <= hi else f"must be [low, high] within [{lo}, {hi}], got {list(value)}"

    return check


# The training config's values, checked when it is loaded (so `lvd pretrain` rejects them before any work).
CHECKS = {
    "seed": integer(lo=0),
    "mode": choice("dino", "dinov2", "distill"),
    "model.arch": _registry_model,
    "model.drop_path_rate": number(lo=0.0, hi=1.0),
    "model.drop_path_uniform": boolean,
    "model.freeze_backbone": boolean,
    "data.batch_size_per_rank": integer(lo=1),
    "data.num_workers": integer(lo=0),
    "data.image_size": integer(lo=1),
    "crops.global_size": integer(lo=1),
    "crops.local_size": integer(lo=1),
    "crops.n_local": integer(lo=0),
    "crops.global_scale": _pair(0.0, 1.0),
    "crops.local_scale": _pair(0.0, 1.0),
    "dino_head.prototypes": integer(lo=1),
    "ibot_head.prototypes": integer(lo=1),
    "dino_head.norm_last_layer": boolean,
    "ibot_head.norm_last_layer": boolean,
    "masking.ratio_min": number(lo=0.0, hi=1.0),
    "masking.ratio_max": number(lo=0.0, hi=1.0),
    "masking.sample_probability": number(lo=0.0, hi=1.0),
    "loss.centering": choice("sinkhorn_knopp", "softmax"),
    "loss.sinkhorn_iters": integer(lo=1),
    "loss.student_temp": number(lo=1e-9),
    "loss.dino_weight": number(lo=0.0),
    "loss.ibot_weight": number(lo=0.0),
    "loss.koleo_weight": number(lo=0.0),
    "loss.gram_weight": number(lo=0.0),
    "gram.start": integer(lo=0),
    "gram.refresh": integer(lo=0),
    "gram.teacher_resolution": choice(1, 2),
    "gram.remove_negative": choice("both", "teacher", "none"),
    "distill.ibot_patches": choice("sampled", "all"),
    "optim.epochs": integer(lo=1),
    "optim.iters_per_epoch": integer(lo=1),
    "optim.lr": number(lo=0.0),
    "optim.scaling_rule": choice(*SCALING_RULES),
    "optim.scale_lr": choice(None, True, False),
    "optim.warmup_epochs": integer(lo=0),
    "optim.momentum_teacher": number(lo=0.0, hi=1.0),
    "optim.final_momentum_teacher": number(lo=0.0, hi=1.0),
    "optim.teacher_temp": number(lo=1e-9),
    "optim.layerwise_decay": number(lo=0.0, hi=1.0),
    "optim.clip_grad": number(lo=0.0, nullable=True),
    "optim.optimizer": choice("adamw", "sgd"),
    "optim.sgd_momentum": number(lo=0.0, hi=1.0),
    "train.dtype": choice("auto", "float32", "bfloat16"),
    "train.parallel": choice("ddp", "fsdp"),
    "train.checkpoint_every": integer(lo=1),
    "train.keep_checkpoints": integer(lo=1),
    "train.log_every": integer(lo=1),
    "train.stop_after": integer(lo=1, nullable=True),
}


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> DictConfig:
    """defaults <- file <- overrides; keys absent from the defaults are errors (`lvd.common.config`),
    and so are values outside `CHECKS`."""
    cfg = merge_config(packaged_config_path("pretrain"), path, overrides)
    check_values(cfg)
    return cfg


def check_values(cfg: DictConfig) -> None:
    problems = config_problems(cfg, CHECKS)
    if not problems:
        problems = _backbone_problems(cfg) + _mode_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    from lvd.pretrain.train.phases import plan_phases

    plan_phases(cfg)  # raises on a phase that does not fit


def _mode_problems(cfg: DictConfig) -> list[str]:
    """What mode distill and a frozen backbone need from the rest of the config."""
    problems = []
    if cfg.mode == "distill" and not cfg.distill.teacher:
        problems.append("mode distill needs distill.teacher: the file of the teacher to distil from")
    if cfg.model.freeze_backbone and cfg.model.weights is None:
        problems.append("model.freeze_backbone trains the heads of a given backbone: set model.weights")
    if cfg.model.freeze_backbone and cfg.mode == "distill":
        problems.append("model.freeze_backbone fits heads by self-distillation: use mode dinov2 (or dino)")
    return problems


def _backbone_problems(cfg: DictConfig) -> list[str]:
    """What a ConvNet backbone cannot do: masked-patch (iBOT) training, FSDP with BatchNorm."""
    from lvd.pretrain.models.registry import get_spec

    spec = get_spec(cfg.model.arch)
    problems = []
    if spec.is_convnet and cfg.mode != "dino" and cfg.loss.ibot_weight > 0:
        problems.append(
            f"model.arch {spec.name} is a ConvNet: it has no patch tokens to mask, so it trains with mode: dino "
            "(or loss.ibot_weight: 0)"
        )
    if spec.kind == "resnet" and cfg.train.parallel == "fsdp":
        problems.append(f"model.arch {spec.name} has BatchNorm, which FSDP does not shard: use train.parallel: ddp")
    return problems


def effective_loss_settings(cfg: DictConfig) -> dict:
    """What the losses and masking really use once `mode` is applied (dino = DINO v1).

    `distill` is dinov2's objective against a frozen teacher whose student sees its global
    crops unmasked (`mask_student` false); the iBOT term still compares the patches the masking
    generator picks (or all of them, `distill.ibot_patches`).
    """
    dino_v1 = cfg.mode == "dino"
    if cfg.mode not in ("dino", "dinov2", "distill"):
        raise ValueError(f"mode must be dino, dinov2 or distill, not {cfg.mode!r}")
    return {
        "centering": "softmax" if dino_v1 else cfg.loss.centering,
        "ibot": (not dino_v1) and cfg.loss.ibot_weight > 0,
        "ibot_weight": 0.0 if dino_v1 else float(cfg.loss.ibot_weight),
        "koleo_weight": 0.0 if dino_v1 else float(cfg.loss.koleo_weight),
        "dino_weight": float(cfg.loss.dino_weight),
        "distill": cfg.mode == "distill",
        "mask_student": cfg.mode != "distill",
    }
