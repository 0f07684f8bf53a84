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


def build_schedules(optim, total_iters: int, iters_per_epoch: int, global_batch_size: int) -> dict[str, np.ndarray]:
    """lr, weight decay, EMA momentum, teacher temperature and last-layer lr, one value per iteration.

    The base lr is scaled linearly with the global batch size (lr * batch / 1024). The references
    differ: DINOv2 scales by sqrt(batch / 1024) (its `sqrt_wrt_1024`), DINO v1 by batch / 256; at a
    global batch of 1024 lvd and DINOv2 agree.
    """
    epochs = lambda n: int(round(n * iters_per_epoch))  # noqa: E731 - epochs may be fractional
    lr = optim["lr"] * global_batch_size / 1024.0 if optim["scale_lr"] else optim["lr"]
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
