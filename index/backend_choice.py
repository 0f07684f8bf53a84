"""`backend: auto`: the vector engine and dtype measured fastest here, on the job's own shapes.

Candidates are Faiss (where its build runs on the device), torch in fp32 and torch in bf16
(only where the hardware has native bf16: elsewhere it is emulated and never wins). Each is
timed on a sample of the job's rows (up to 8192 base rows, enough queries for about 5e8
multiply-adds: tens of milliseconds a run), the result is cached per machine with the
machine's load when measured (`lvd.common.calibration`, which re-measures when that has
changed), and the choice is logged with every candidate's time. A job too small to repay its
calibration (the timings would cost more than CALIBRATION_SHARE of one search of the job)
takes Faiss unmeasured. All candidates return fp32-exact results (the bf16 path
proves or recomputes its candidates), so the choice changes speed, never the neighbours
beyond float32 rounding of the similarities.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from lvd.common.calibration import choose
from lvd.common.devices import has_native_bf16, resolve_device
from lvd.index.backends import FaissBackend, TorchBackend, VectorBackend, _as_f32, _faiss_has_gpu, get_backend

log = logging.getLogger(__name__)

#: base rows a calibration searches at most, and query rows at least / at most (sampled from the
#: job's own rows); between them the queries fill CALIBRATION_WORK multiply-adds, so that a small
#: base (k-means centroids) is timed on query blocks like the ones the job will run. (Each engine
#: is timed after a run of its own, so its cost per query is already steady at 512 queries.)
CALIBRATION_BASE = 8192
CALIBRATION_QUERIES = 512
CALIBRATION_MAX_QUERIES = 16384
CALIBRATION_WORK = 500_000_000
#: interleaved rounds of the calibration (each runs every candidate twice, timing the second)
CALIBRATION_ROUNDS = 3
#: the most of one search of the job that its calibration may cost (all candidates, all runs)
CALIBRATION_SHARE = 0.25
#: below this much work (multiply-adds) a job is too small for its timing to matter or to be measured
MIN_CALIBRATED_WORK = 50_000_000


def candidate_engines(device="cpu", backend: str = "auto", dtype: str = "auto") -> dict[str, VectorBackend]:
    """Every engine `backend`/`dtype` allows on `device`, by name (faiss, torch-fp32, torch-bf16)."""
    device = resolve_device(device)
    engines: dict[str, VectorBackend] = {}
    if backend in ("auto", "faiss") and (device.type == "cpu" or _faiss_has_gpu()):
        engines["faiss"] = FaissBackend(device)
    if backend in ("auto", "torch"):
        if dtype == "auto":
            dtypes = ["fp32", "bf16"] if has_native_bf16(device) else ["fp32"]
        else:
            dtypes = [dtype]
        for name in dtypes:
            engine = TorchBackend(device, name)
            engines[f"torch-{engine.dtype}"] = engine
    if not engines:
        raise ValueError(f"unknown vector backend {backend!r}; expected auto, faiss or torch")
    return engines


def _sample(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    if len(x) <= n:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))]


def _bucket(n: int) -> int:
    """Round up to a power of two, so that jobs of similar size share a measurement."""
    return 1 << max(0, int(n - 1).bit_length())


def choose_backend(
    task: str,
    base,
    queries,
    k: int,
    *,
    metric: str = "ip",
    exclude_self: bool = False,
    backend="auto",
    device="cpu",
    dtype: str = "auto",
    measure=None,
    agree=None,
) -> VectorBackend:
    """The engine for searching `queries` against `base` (k best, `metric`), chosen by measurement
    when `backend` is "auto" (or "torch" with dtype "auto" on a bf16 machine).

    `agree(name, names)` (optional) makes every rank of a distributed job take rank 0's choice.
    """
    if isinstance(backend, VectorBackend):
        return backend
    device = resolve_device(device)
    if backend not in ("auto", "torch"):
        return get_backend(backend, device, dtype)
    engines = candidate_engines(device, backend, dtype)
    names = sorted(engines)
    if len(engines) == 1:
        return engines[names[0]]
    base = _as_f32(base)
    sample_base = _sample(base, CALIBRATION_BASE)
    wanted = CALIBRATION_WORK // max(1, len(sample_base) * base.shape[1])
    n_queries = int(min(max(wanted, CALIBRATION_QUERIES), CALIBRATION_MAX_QUERIES))
    # A k-NN graph is timed as a search of some of its rows: the cost per query row is the same.
    sample_queries = sample_base[:n_queries] if exclude_self else _sample(_as_f32(queries), n_queries, seed=1)
    kk = max(1, min(k, len(sample_base)))
    nq = len(sample_queries)
    job_work = len(base) * (len(base) if exclude_self else len(queries)) * base.shape[1]
    calibration_work = len(sample_base) * nq * base.shape[1] * 2 * CALIBRATION_ROUNDS * len(engines)
    if job_work < MIN_CALIBRATED_WORK or calibration_work > CALIBRATION_SHARE * job_work:
        name = "faiss" if "faiss" in engines else names[0]
        log.debug("%s: %s backend (job too small to repay a measurement)", task, name)
        return engines[agree(name, names) if agree is not None else name]  # every rank joins the vote

    def job(engine: VectorBackend):
        return engine.search(sample_base, sample_queries, kk, metric=metric)

    shape = {
        "base": _bucket(len(sample_base)),
        "queries": _bucket(nq),
        "d": int(base.shape[1]),
        "k": _bucket(kk),
        "metric": metric,
    }
    choice = choose(
        task,
        shape,
        {n: functools.partial(job, e) for n, e in engines.items()},
        device=device,
        repeats=CALIBRATION_ROUNDS,
        measure=measure,
    )
    name = agree(choice.name, names) if agree is not None else choice.name
    log.info("%s: %s backend, %s", task, name, choice.describe() if name == choice.name else "as rank 0 chose")
    return engines[name]


__all__ = ["candidate_engines", "choose_backend", "CALIBRATION_BASE", "CALIBRATION_QUERIES"]
