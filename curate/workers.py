"""How many worker processes a stage uses, whether it shows progress, and mapping over them.

One place for what every CPU-bound stage (manifest decoding, shard writing, embedding's
DataLoader) does the same way: `workers: auto` means the cores this process may use, and
work goes to spawned processes (safe with threads and torch in the parent) only when more
than one process can help.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context


def resolve_workers(value) -> int:
    """`workers` from the config: "auto"/None = usable cores, else a count (0 = in-process)."""
    if value in (None, "auto"):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, int(value))


def rank_workers(value, ranks) -> int:
    """`workers` for one rank of a torchrun group. The ranks of one host share its cores
    (LOCAL_WORLD_SIZE ranks per host, as torchrun says) unless a scheduler gave each its own
    (Slurm binds a task to its --cpus-per-task cores): then `auto` is this rank's own cores."""
    workers = resolve_workers(value)
    usable = resolve_workers("auto")
    shared = ranks.world > 1 and usable >= (os.cpu_count() or usable)
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world)) if shared else 1
    return max(1, workers // sharing) if workers else 0


def show_progress(value) -> bool:
    """`progress` from the config: "auto"/None = only when stderr is a terminal."""
    if value in (None, "auto"):
        return sys.stderr.isatty()
    return bool(value)


def process_map(fn: Callable, items: Sequence, workers: int) -> Iterator:
    """`map(fn, items)` in order, in spawned worker processes when that can help."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        yield from pool.map(fn, items, chunksize=1)


__all__ = ["resolve_workers", "rank_workers", "show_progress", "process_map"]
