"""Measured choices: time every way of doing a job on this machine and keep the fastest.

The fastest vector engine and dtype differ by machine (an AVX2-only CPU emulates bf16 ~100x
slower than fp32; a CPU with AVX-512 BF16 runs a bf16 matmul ~3x faster than fp32, but a path
that must re-score its bf16 candidates can still lose to Faiss), so `auto` settings are decided
by a short measurement on the shapes the job will run, not by a rule written on one machine.

They also differ with what else the machine is doing: Faiss's OpenMP threads lose far more than
a BLAS product does when other jobs share the cores, so a choice measured on a busy machine can
be the slower one once it is quiet. Every measurement therefore records the conditions it was
made under (the speed of a small reference matmul just before and just after it, and the load
average), and a cached choice is used only while the reference runs at about the same speed
(within SPEED_TOLERANCE) and the entry is younger than MAX_AGE_S; otherwise the job measures
again at its start (tens of milliseconds to a second) and the new result replaces the old one.
Each candidate's time is the median of interleaved rounds (each timed run right after an untimed
one of the same candidate, as a job runs it), so one burst of load neither makes nor breaks a
candidate.

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
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lvd.common.atomic import atomic_write_json
from lvd.common.devices import cpu_has_native_bf16

log = logging.getLogger(__name__)

CACHE_FILE = "calibration.json"
#: entries older than this are measured again (a changed BIOS, kernel or neighbour moves timings)
MAX_AGE_S = 7 * 24 * 3600
#: a cached entry stands while the reference matmul runs within this factor of its speed then
#: (on a 2-core machine, one other busy process halves it; run-to-run noise is a few percent)
SPEED_TOLERANCE = 1.4
#: side of the reference matmul and its timed rounds: ~2 ms a round on 2 AVX2 cores (30 ms in
#: all), so the median spans several scheduler time slices and one preempted round cannot move it
REFERENCE_SIDE = {"cpu": 512, "other": 4096}
REFERENCE_ROUNDS = 15


@dataclass(frozen=True)
class Choice:
    """The chosen candidate, every candidate's median time, whether it came from the cache, and
    the conditions it was measured under."""

    name: str
    seconds: dict[str, float]
    cached: bool = False
    conditions: dict = field(default_factory=dict)

    def describe(self) -> str:
        others = ", ".join(
            f"{n} {s * 1e3:.1f} ms" for n, s in sorted(self.seconds.items(), key=lambda kv: kv[1]) if n != self.name
        )
        where = "cached measurement" if self.cached else "measured now"
        if self.conditions:
            where += f" {describe_conditions(self.conditions)}"
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


def reference_speed(device: torch.device) -> float:
    """GFLOP/s of a small fp32 matmul on `device` right now (median of a few rounds): how much of
    the machine a job gets at this moment, which other processes' load changes."""
    side = REFERENCE_SIDE["cpu" if device.type == "cpu" else "other"]
    a = torch.linspace(-1.0, 1.0, side * side, device=device).view(side, side)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # warm-up: threads woken, kernels loaded
        a @ a
    sync()
    rounds = []
    for _ in range(REFERENCE_ROUNDS):
        start = time.perf_counter()
        a @ a
        sync()
        rounds.append(time.perf_counter() - start)
    return 2.0 * side**3 / max(statistics.median(rounds), 1e-9) / 1e9


def load_per_cpu() -> float | None:
    """The 1-minute load average per CPU, None where the system does not keep one."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return None


def current_conditions(device: torch.device) -> dict:
    """What a measurement's answer depends on besides the machine: how busy the machine is now."""
    return {"speed_gflops": round(reference_speed(device), 2), "load_per_cpu": load_per_cpu()}


def describe_conditions(conditions: Mapping) -> str:
    speed = conditions.get("speed_gflops")
    speeds = "/".join(f"{s:.0f}" for s in speed) if isinstance(speed, list) else f"{speed:.0f}"
    load = conditions.get("load_per_cpu")
    return f"(reference matmul {speeds} GFLOP/s" + (f", load {load:.2f} per CPU)" if load is not None else ")")


def stale_because(entry: Mapping, now: Mapping, at: float | None = None) -> str | None:
    """Why a cached entry no longer describes this machine (None: it still does).

    The load average is recorded but not compared: it lags a minute behind and counts this
    process's own threads, while the reference matmul says how fast a job runs now.
    """
    at = time.time() if at is None else at
    age = at - float(entry.get("at", 0))
    if age > MAX_AGE_S:
        return f"measured {age / 86400:.0f} days ago"
    then = entry.get("conditions", {}).get("speed_gflops")
    if not then:
        return "measured without a record of the machine's load"
    speed = float(now["speed_gflops"])
    for before in then if isinstance(then, list) else [then]:
        ratio = max(speed, 1e-9) / max(float(before), 1e-9)
        if not 1 / SPEED_TOLERANCE <= ratio <= SPEED_TOLERANCE:
            return f"the machine runs at {ratio:.2f}x the speed it was measured at"
    return None


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
    """Median wall time of each job over `repeats` interleaved rounds.

    Every round runs every job, so a burst of load from another process falls on all candidates,
    not on one, and the median keeps one lucky or unlucky round from deciding. Within a round each
    job runs twice in a row and only the second run is timed: a job runs its engine continuously,
    while an engine timed right after another pays for the other's worker threads, which spin on
    for a while after each call (OpenBLAS, OpenMP; on 2 cores this doubled Faiss's time for a
    search of 512 x 8192 rows after a torch one).
    """
    names = sorted(jobs)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(max(1, repeats)):
        for name in names:
            jobs[name]()  # settles this engine's threads (and lets the previous one's go idle)
            start = time.perf_counter()
            jobs[name]()
            rounds[name].append(time.perf_counter() - start)
    return {name: statistics.median(r) for name, r in rounds.items()}


def measured(
    task: str,
    shape: Mapping,
    jobs: Mapping[str, Callable[[], object]],
    *,
    device: torch.device,
    repeats: int = 2,
    measure: Callable[[Callable[[], object], int], float] | None = None,
) -> tuple[dict[str, float], bool, dict]:
    """(seconds per job, whether they came from the cache, the conditions they were measured
    under) for `task` at `shape` on this machine; see `timings`."""
    folder = cache_folder()
    key = _entry_key(task, shape, device)
    names = sorted(jobs)
    now = None
    if folder is not None:
        hit = _load(folder / CACHE_FILE).get(key)
        if hit and sorted(hit.get("seconds", {})) == names:
            now = current_conditions(device)
            why = stale_because(hit, now)
            if why is None:
                return {n: float(s) for n, s in hit["seconds"].items()}, True, hit["conditions"]
            log.info("%s: measuring again: %s %s", task, why, describe_conditions(hit.get("conditions") or now))
    before = now if now is not None else current_conditions(device) if folder is not None else {}
    if measure is None:
        seconds = time_interleaved(jobs, repeats)
    else:
        seconds = {name: float(measure(jobs[name], repeats)) for name in names}
    if folder is None:
        return seconds, False, {}
    after = current_conditions(device)
    conditions = {
        "speed_gflops": [before["speed_gflops"], after["speed_gflops"]],
        "load_per_cpu": after["load_per_cpu"],
    }
    try:
        data = _load(folder / CACHE_FILE)
        data[key] = {
            "task": task,
            "shape": dict(shape),
            "seconds": seconds,
            "at": time.time(),
            "conditions": conditions,
        }
        atomic_write_json(folder / CACHE_FILE, data)
    except OSError as err:  # a read-only home must not stop a run
        log.debug("calibration cache not written: %s", err)
    return seconds, False, conditions


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

    A cached entry answers only while it is current (`stale_because`); otherwise the jobs are
    timed again and replace it. `measure(job, repeats)` returns seconds (default:
    `time_interleaved` over all jobs); tests pass a fake one (and a fresh cache folder) to make
    the timings deterministic on any machine.
    """
    seconds, cached, _ = measured(task, shape, jobs, device=device, repeats=repeats, measure=measure)
    return seconds, cached


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
    seconds, cached, conditions = measured(task, shape, candidates, device=device, repeats=repeats, measure=measure)
    best = min(sorted(seconds), key=lambda n: (seconds[n], n))
    return Choice(best, seconds, cached=cached, conditions=conditions)


__all__ = [
    "Choice",
    "choose",
    "timings",
    "measured",
    "time_interleaved",
    "cache_folder",
    "machine_key",
    "current_conditions",
    "reference_speed",
    "stale_because",
]
