"""Measured choices: time every way of doing a job on this machine and keep the fastest.

The fastest vector engine and dtype differ by machine (an AVX2-only CPU emulates bf16 ~100x
slower than fp32; a CPU with AVX-512 BF16 runs a bf16 matmul ~3x faster than fp32, but a path
that must re-score its bf16 candidates can still lose to Faiss), so `auto` settings are decided
by a short measurement on the shapes the job will run, not by a rule written on one machine.

A measurement is cached by what makes its answer valid: the job and its shape, the machine
(CPU model, torch's kernel capability, native bf16, threads, accelerator) and the library
versions, in `$LVD_CACHE_DIR` (else `$XDG_CACHE_HOME/lvd`, else `~/.cache/lvd`); set
`LVD_CACHE_DIR=off` to measure every time without a cache. Correctness never depends on the
choice: every candidate must give the same results within its documented tolerance.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lvd.common.atomic import atomic_write_json
from lvd.common.devices import cpu_has_native_bf16

log = logging.getLogger(__name__)

CACHE_FILE = "calibration.json"
#: entries older than this are measured again (a changed BIOS or kernel can move timings)
MAX_AGE_S = 30 * 24 * 3600


@dataclass(frozen=True)
class Choice:
    """The chosen candidate, every candidate's best time, and whether it came from the cache."""

    name: str
    seconds: dict[str, float]
    cached: bool = False

    def describe(self) -> str:
        others = ", ".join(
            f"{n} {s * 1e3:.1f} ms" for n, s in sorted(self.seconds.items(), key=lambda kv: kv[1]) if n != self.name
        )
        where = "cached measurement" if self.cached else "measured now"
        return f"{self.name} ({self.seconds[self.name] * 1e3:.1f} ms{'; ' + others if others else ''}; {where})"


def cache_folder() -> Path | None:
    """Where measurements are kept, or None when caching is off."""
    explicit = os.environ.get("LVD_CACHE_DIR")
    if explicit is not None:
        return None if explicit.lower() in ("", "off", "none", "0") else Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lvd"


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device: torch.device) -> dict:
    """What a timing depends on besides the job: hardware, kernel limits, threads, libraries."""
    key = {
        "cpu": _cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device.type),
    }
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    try:
        import faiss

        key["faiss"] = faiss.__version__
    except ImportError:
        key["faiss"] = None
    return key


def _entry_key(task: str, shape: Mapping, device: torch.device) -> str:
    text = json.dumps({"task": task, "shape": dict(shape), "machine": machine_key(device)}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def time_interleaved(jobs: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each job over `repeats` rounds after a warm-up round; every round runs
    every job, so a burst of load from another process falls on all candidates, not on one."""
    names = sorted(jobs)
    for name in names:
        jobs[name]()
    best = {name: float("inf") for name in names}
    for _ in range(max(1, repeats)):
        for name in names:
            start = time.perf_counter()
            jobs[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def timings(
    task: str,
    shape: Mapping,
    jobs: Mapping[str, Callable[[], object]],
    *,
    device: torch.device,
    repeats: int = 2,
    measure: Callable[[Callable[[], object], int], float] | None = None,
) -> tuple[dict[str, float], bool]:
    """(seconds per job, whether they came from the cache) for `task` at `shape` on this machine.

    `measure(job, repeats)` returns seconds (default: `time_interleaved` over all jobs); tests pass a fake one
    (and a fresh cache folder) to make the timings deterministic on any machine.
    """
    folder = cache_folder()
    key = _entry_key(task, shape, device)
    names = sorted(jobs)
    if folder is not None:
        hit = _load(folder / CACHE_FILE).get(key)
        if hit and sorted(hit.get("seconds", {})) == names and time.time() - hit.get("at", 0) < MAX_AGE_S:
            return {n: float(s) for n, s in hit["seconds"].items()}, True
    if measure is None:
        seconds = time_interleaved(jobs, repeats)
    else:
        seconds = {name: float(measure(jobs[name], repeats)) for name in names}
    if folder is not None:
        try:
            data = _load(folder / CACHE_FILE)
            data[key] = {"task": task, "shape": dict(shape), "seconds": seconds, "at": time.time()}
            atomic_write_json(folder / CACHE_FILE, data)
        except OSError as err:  # a read-only home must not stop a run
            log.debug("calibration cache not written: %s", err)
    return seconds, False


def choose(
    task: str,
    shape: Mapping,
    candidates: Mapping[str, Callable[[], object]],
    *,
    device: torch.device,
    repeats: int = 2,
    measure: Callable[[Callable[[], object], int], float] | None = None,
) -> Choice:
    """The fastest of `candidates` (name -> job) for `task` at `shape`, measured or cached."""
    if not candidates:
        raise ValueError(f"no candidate for {task}")
    if len(candidates) == 1:
        (name,) = candidates
        return Choice(name, {name: 0.0}, cached=False)
    seconds, cached = timings(task, shape, candidates, device=device, repeats=repeats, measure=measure)
    best = min(sorted(seconds), key=lambda n: (seconds[n], n))
    return Choice(best, seconds, cached=cached)


__all__ = ["Choice", "choose", "timings", "time_interleaved", "cache_folder", "machine_key"]
