"""Per-iteration schedules (arrays indexed by iteration), as DINO/DINOv2 precompute them.

Precomputing makes resume trivial: the value at iteration i depends on i alone.
"""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    start: float, end: float, total_iters: int, warmup_iters: int = 0, warmup_start: float = 0.0, freeze_iters: int = 0
) -> np.ndarray:
    """`freeze_iters` zeros, then a linear warm-up warmup_start -> start, then cosine start -> end."""
    freeze = np.zeros(freeze_iters)
    warm = np.linspace(warmup_start, start, warmup_iters, endpoint=False) if warmup_iters else np.zeros(0)
    n = max(total_iters - freeze_iters - warmup_iters, 0)
    steps = np.arange(n)
    cos = end + 0.5 * (start - end) * (1 + np.cos(np.pi * steps / max(n, 1)))
    out = np.concatenate([freeze, warm, cos])[:total_iters]
    assert len(out) == total_iters, "freeze + warm-up iterations exceed the total"
    return out


def linear_warmup_constant(start: float, end: float, total_iters: int, warmup_iters: int) -> np.ndarray:
    """Linear start -> end over `warmup_iters`, then constant `end` (the teacher temperature)."""
    warm = np.linspace(start, end, warmup_iters) if warmup_iters else np.zeros(0)
    rest = np.full(max(total_iters - warmup_iters, 0), end)
    return np.concatenate([warm, rest])[:total_iters]


#: how the base lr follows the global batch: DINOv2's square root of batch / 1024, DINO v1's linear
#: rule for an lr given per 256 images, the linear rule per 1024 images, or the lr as given
SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256", "linear_wrt_1024", "none")


def scaling_rule(optim) -> str:
    """The rule in force: `scaling_rule`, or the older boolean `scale_lr` where a config still sets it
    (true was the linear rule per 1024 images, false no scaling)."""
    legacy = optim.get("scale_lr")
    if legacy is not None:
        return "linear_wrt_1024" if legacy else "none"
    return optim.get("scaling_rule", "sqrt_wrt_1024")


def scaled_lr(lr: float, rule: str, global_batch_size: int) -> float:
    """The peak lr for `global_batch_size` images per step under `rule` (one of SCALING_RULES).

    DINOv2 takes 0.004 at 1024 images to 0.001 at 64 (sqrt); DINO v1 gives 0.0005 per 256
    images (linear). The rules agree at their reference batch only.
    """
    if rule == "sqrt_wrt_1024":
        return lr * (global_batch_size / 1024.0) ** 0.5
    if rule == "linear_wrt_256":
        return lr * global_batch_size / 256.0
    if rule == "linear_wrt_1024":
        return lr * global_batch_size / 1024.0
    if rule == "none":
        return lr
    raise ValueError(f"optim.scaling_rule must be one of {', '.join(SCALING_RULES)}, not {rule!r}")


def build_schedules(optim, total_iters: int, iters_per_epoch: int, global_batch_size: int) -> dict[str, np.ndarray]:
    """lr, weight decay, EMA momentum, teacher temperature and last-layer lr, one value per iteration.

    The base lr follows the global batch by `optim.scaling_rule` (`scaled_lr`).
    """
    epochs = lambda n: int(round(n * iters_per_epoch))  # noqa: E731 - epochs may be fractional
    lr = scaled_lr(optim["lr"], scaling_rule(optim), global_batch_size)
    lr_s = cosine_schedule(lr, optim["min_lr"], total_iters, epochs(optim["warmup_epochs"]))
    last_layer = lr_s.copy()
    last_layer[: epochs(optim["freeze_last_layer_epochs"])] = 0.0
    return {
        "lr": lr_s,
        "last_layer_lr": last_layer,
        "wd": cosine_schedule(optim["weight_decay"], optim["weight_decay_end"], total_iters),
        "momentum": cosine_schedule(optim["momentum_teacher"], optim["final_momentum_teacher"], total_iters),
        "teacher_temp": linear_warmup_constant(
            optim["warmup_teacher_temp"],
            optim["teacher_temp"],
            total_iters,
            epochs(optim["warmup_teacher_temp_epochs"]),
        ),
    }
