"""Training phases: the first phase is the config's own settings, `phases:` lists those after it.

DINOv2 ends pretraining with a short phase at a higher resolution (224 -> 518 px), with the
same schedules compressed into it and a lower learning rate; DINOv3 does the same with mixed
resolutions and Gram anchoring. A phase here is a span of global iterations with its own
crops, data decoding size, schedules (replayed over the phase), masking and Gram settings;
each phase item changes only what it names and inherits the rest from the phase before it.

Everything a phase does depends on the global iteration alone (which phase it falls in, the
schedule value at its offset in the phase), so a run resumed anywhere, at a phase boundary
included, repeats the uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from lvd.common.config import ConfigError
from lvd.common.config_checks import config_problems

# What a phase item may change, block by block (None: any key of that block).
PHASE_SETTINGS: dict[str, tuple[str, ...] | None] = {
    "crops": ("global_size", "local_size", "n_local", "global_scale", "local_scale"),
    "data": ("image_size", "batch_size_per_rank"),
    "optim": (
        "lr",
        "scaling_rule",
        "scale_lr",
        "min_lr",
        "warmup_epochs",
        "iters_per_epoch",
        "weight_decay",
        "weight_decay_end",
        "momentum_teacher",
        "final_momentum_teacher",
        "teacher_temp",
        "warmup_teacher_temp",
        "warmup_teacher_temp_epochs",
        "freeze_last_layer_epochs",
        "clip_grad",
    ),
    "masking": None,
    "loss": ("gram_weight",),
    "gram": None,
}
PHASE_FIELDS = ("name", "iterations", "init")
INITS = ("from_ema", "continue")


@dataclass(frozen=True)
class Phase:
    """Global iterations [start, stop) trained with `cfg` (the run's config, this phase's settings in place)."""

    index: int
    name: str
    start: int
    stop: int
    init: str  # how the phase begins: "weights" (the first), "from_ema" or "continue"
    cfg: DictConfig

    @property
    def iterations(self) -> int:
        return self.stop - self.start

    @property
    def global_size(self) -> int:
        return int(self.cfg.crops.global_size)


def plan_phases(cfg: DictConfig) -> list[Phase]:
    """The run's phases in order; a ConfigError names the first item that does not fit."""
    from lvd.pretrain.train.config import CHECKS

    first = int(cfg.optim.epochs) * int(cfg.optim.iters_per_epoch)
    phases = [Phase(0, "main", 0, first, "weights", cfg)]
    _check_schedule_fits(cfg, first, "the first phase")
    items = cfg.get("phases") or []
    for i, item in enumerate(items, start=1):
        where = f"phases[{i - 1}]"
        if not OmegaConf.is_dict(item):
            raise ConfigError(f"{where} must be a mapping of phase settings, got {item!r}")
        changes = _phase_changes(item, where)
        iterations = item.get("iterations")
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
            raise ConfigError(f"{where}.iterations must be a positive integer (the phase's length), got {iterations!r}")
        init = item.get("init", "from_ema")
        if init not in INITS:
            raise ConfigError(f"{where}.init must be one of {list(INITS)}, got {init!r}")
        phase_cfg = phases[-1].cfg.copy()
        phase_cfg.merge_with(changes)
        problems = config_problems(phase_cfg, {k: v for k, v in CHECKS.items() if k.split(".")[0] in PHASE_SETTINGS})
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))
        _check_schedule_fits(phase_cfg, iterations, where)
        start = phases[-1].stop
        name = str(item.get("name") or f"phase{i}")
        phases.append(Phase(i, name, start, start + iterations, init, phase_cfg))
    return phases


def _phase_changes(item: DictConfig, where: str) -> dict:
    """The settings a phase item changes, as a nested dict; unknown keys are errors."""
    changes = {}
    for key in item:
        if key in PHASE_FIELDS:
            continue
        if key not in PHASE_SETTINGS:
            raise ConfigError(
                f"{where}.{key}: a phase sets {', '.join(PHASE_FIELDS)} and the blocks "
                f"{', '.join(PHASE_SETTINGS)}; the other settings hold for the whole run"
            )
        block = item[key]
        if not OmegaConf.is_dict(block):
            raise ConfigError(f"{where}.{key} must be a mapping, got {block!r}")
        allowed = PHASE_SETTINGS[key]
        for sub in block:
            if allowed is not None and sub not in allowed:
                hint = " (a phase's length is its `iterations`)" if (key, sub) == ("optim", "epochs") else ""
                raise ConfigError(
                    f"{where}.{key}.{sub} cannot change in a phase{hint}; it may set {', '.join(allowed)}"
                )
        changes[key] = OmegaConf.to_container(block, resolve=True)
    return changes


def _check_schedule_fits(cfg: DictConfig, iterations: int, where: str) -> None:
    """The learning-rate warm-up of a phase must fit in it (counted in its optim.iters_per_epoch)."""
    needed = int(round(float(cfg.optim.warmup_epochs) * int(cfg.optim.iters_per_epoch)))
    if needed > iterations:
        raise ConfigError(
            f"{where}: optim.warmup_epochs x optim.iters_per_epoch = {needed} iterations, more than the phase's "
            f"{iterations}: shorten the warm-up or lower optim.iters_per_epoch for the phase"
        )


def phase_at(phases: list[Phase], iteration: int) -> Phase:
    """The phase that trains global iteration `iteration` (the last one past the end)."""
    for phase in phases:
        if iteration < phase.stop:
            return phase
    return phases[-1]
