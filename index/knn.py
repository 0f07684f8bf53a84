"""k-NN graphs (every row against every other) and searches of queries against a base.

Exact search costs n^2 d; past a size it is replaced by an inverted-file index (Faiss IVF),
whose cost grows as n^1.5. On a CPU the size is the measured crossover of the two on this
machine (`ivf_switch.measured_exact_max`); `plan_knn` turns it, the device and a memory budget
into a plan, which is logged, so a run says how its graph was made. An IVF graph is checked
against exact search on a sample of rows, and nprobe raised until near-duplicate edges are
kept (`ivf_switch.RECALL_TARGET`). Both paths batch the queries, so memory stays bounded by the
index plus one batch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from lvd.common import memory
from lvd.common.devices import resolve_device
from lvd.index import ivf_switch
from lvd.index.backend_choice import choose_backend
from lvd.index.backends import FaissBackend, _as_f32, _check_metric, _drop_self, _empty_result

log = logging.getLogger(__name__)

# Largest pool searched exactly on an accelerator (tensor-core matmul makes n^2 affordable).
EXACT_MAX_ACCELERATOR = 2_000_000
# Vectors per inverted list aimed at: nlist = IVF_LIST_FACTOR * sqrt(n) (Faiss's guideline).
IVF_LIST_FACTOR = 4
# Lists visited per query; near-duplicates sit in their query's own list or the next ones.
DEFAULT_NPROBE = 32
# Training points per list for the coarse quantizer (Faiss warns below 39).
IVF_TRAIN_PER_LIST = 64


@dataclass(frozen=True)
class KnnPlan:
    """How a k-NN graph will be computed, and why."""

    method: str  # "exact" or "ivf"
    factory: str | None  # Faiss index factory string for "ivf"
    nlist: int
    nprobe: int
    reason: str


def plan_knn(
    n: int,
    d: int,
    *,
    device="cpu",
    method: str = "auto",
    memory_budget: int | None = None,
    exact_max: int | None = None,
    nprobe: int | None = None,
    nlist: int | None = None,
) -> KnnPlan:
    """Exact up to `exact_max` rows, IVF above; IVF storage shrinks to fit `memory_budget` bytes
    (None: `memory_gb: auto`'s budget), compressed to SQ8, then PQ, when the vectors do not fit.

    `exact_max` None: an accelerator searches up to EXACT_MAX_ACCELERATOR rows exactly; on a CPU
    every pool is exact here (the callers pass the crossover measured on this machine).
    """
    device = resolve_device(device)
    if memory_budget is None:
        memory_budget = memory.memory_budget("auto")
    if exact_max is None:
        exact_max = 2**62 if device.type == "cpu" else EXACT_MAX_ACCELERATOR
    if method not in ("auto", "exact", "ivf"):
        raise ValueError(f"unknown k-NN method {method!r}; expected auto, exact or ivf")
    if method == "exact" or (method == "auto" and n <= exact_max):
        reason = "requested" if method == "exact" else f"{n} rows <= exact_max {exact_max}"
        return KnnPlan("exact", None, 0, 0, reason)
    nlist = int(nlist or max(1, min(n // 8, round(IVF_LIST_FACTOR * math.sqrt(n)))))
    nprobe = int(min(nlist, nprobe or DEFAULT_NPROBE))
    flat_bytes = n * (4 * d + 8)
    if flat_bytes <= memory_budget:
        storage, why = "Flat", "fits the memory budget uncompressed"
    elif n * (d + 8) <= memory_budget:
        storage, why = "SQ8", f"{flat_bytes / 2**30:.1f} GiB uncompressed exceeds the budget"
    else:
        m = next(m for m in (64, 48, 32, 24, 16, 8, 4, 2, 1) if d % m == 0)
        storage, why = f"PQ{m}", "8-bit scalar codes still exceed the budget"
    reason = ("requested" if method == "ivf" else f"{n} rows > exact_max {exact_max}") + f"; {storage}: {why}"
    return KnnPlan("ivf", f"IVF{nlist},{storage}", nlist, nprobe, reason)


def _plan(xb, k, engine, *, device, method, memory_budget, exact_max, nprobe, nlist, metric, seed, measure):
    """plan_knn with, on a CPU under method auto, the crossover measured here."""
    n, d = xb.shape
    options = dict(device=device, memory_budget=memory_budget, nprobe=nprobe, nlist=nlist)
    if method == "auto" and exact_max is None and resolve_device(device).type == "cpu":

        def ivf_graph(rows, kk):
            plan = plan_knn(len(rows), d, method="ivf", **options)
            index = build_ivf(rows, plan, metric=metric, device=device, seed=seed)
            return search_ivf(index, rows, kk, plan.nprobe, exclude_self=True)

        exact_max = ivf_switch.measured_exact_max(xb, k, engine, ivf_graph, metric=metric, seed=seed, measure=measure)
    return plan_knn(n, d, method=method, exact_max=exact_max, **options)


def knn_graph(
    x,
    k: int = 64,
    *,
    metric: str = "ip",
    method: str = "auto",
    backend="auto",
    device="cpu",
    dtype: str = "auto",
    memory_budget: int | None = None,
    exact_max: int | None = None,
    nprobe: int | None = None,
    nlist: int | None = None,
    seed: int = 0,
    min_similarity: float | None = None,
    measure=None,
):
    """(D, I) of the k nearest other rows of every row of x (self excluded).

    D is the similarity (metric "ip", descending) or squared distance ("l2", ascending);
    ids are row numbers of x, -1 where fewer than k other rows exist. `min_similarity`: the
    edges that matter to the caller (dedup's threshold); an IVF graph must keep them.
    """
    x = _as_f32(x)
    _check_metric(metric)
    engine = choose_backend(
        "k-NN graph",
        x,
        x,
        k,
        metric=metric,
        exclude_self=True,
        backend=backend,
        device=device,
        dtype=dtype,
        measure=measure,
    )
    plan = _plan(
        x,
        k,
        engine,
        device=device,
        method=method,
        memory_budget=memory_budget,
        exact_max=exact_max,
        nprobe=nprobe,
        nlist=nlist,
        metric=metric,
        seed=seed,
        measure=measure,
    )
    if plan.method == "ivf" and backend == "torch":
        log.info("k-NN graph: the torch backend has no IVF; searching %d rows exactly", len(x))
        plan = KnnPlan("exact", None, 0, 0, "torch backend")
    log.info("k-NN graph of %d x %d, k=%d: %s (%s)", len(x), x.shape[1], k, plan.factory or "exact", plan.reason)
    if plan.method == "exact":
        return engine.search(x, x, k, metric=metric, exclude_self=True)
    return _checked_ivf(
        x, x, k, plan, engine, metric=metric, exclude_self=True, device=device, seed=seed, min_similarity=min_similarity
    )


def search(
    xb,
    xq,
    k: int,
    *,
    metric: str = "ip",
    method: str = "exact",
    backend="auto",
    device="cpu",
    dtype: str = "auto",
    memory_budget: int | None = None,
    exact_max: int | None = None,
    nprobe: int | None = None,
    nlist: int | None = None,
    seed: int = 0,
    min_similarity: float | None = None,
    measure=None,
):
    """(D, I) of the k best rows of the base `xb` for every query row of `xq`.

    Exact by default (retrieval and decontamination want every neighbour); `method="auto"`
    switches to a checked IVF search for a base past the measured crossover.
    """
    xb, xq = _as_f32(xb), _as_f32(xq)
    _check_metric(metric)
    engine = choose_backend(
        "search", xb, xq, k, metric=metric, backend=backend, device=device, dtype=dtype, measure=measure
    )
    plan = _plan(
        xb,
        k,
        engine,
        device=device,
        method=method,
        memory_budget=memory_budget,
        exact_max=exact_max,
        nprobe=nprobe,
        nlist=nlist,
        metric=metric,
        seed=seed,
        measure=measure,
    )
    if plan.method == "exact" or backend == "torch":
        return engine.search(xb, xq, k, metric=metric)
    return _checked_ivf(xb, xq, k, plan, engine, metric=metric, device=device, seed=seed, min_similarity=min_similarity)


def _checked_ivf(
    xb, xq, k, plan: KnnPlan, exact_engine, *, metric, device, seed, exclude_self=False, min_similarity=None
):
    """IVF search, then nprobe doubled until a sample of queries keeps its near-duplicate edges."""
    index = build_ivf(xb, plan, metric=metric, device=device, seed=seed)
    rows = ivf_switch.check_rows(len(xq), seed)
    if exclude_self:  # the checked rows are rows of the base: they find themselves first, dropped as in the graph
        D_ref, I_ref = _drop_self(*exact_engine.search(xb, xq[rows], min(k + 1, len(xb)), metric=metric), rows)
    else:
        D_ref, I_ref = exact_engine.search(xb, xq[rows], k, metric=metric)
    edges = ivf_switch.check_edges(D_ref, I_ref, min_similarity if metric == "ip" else None)
    nprobe = plan.nprobe
    while True:  # only the checked rows are searched until nprobe is settled; then every row once
        _, I_rows = search_ivf(index, xq[rows], k, nprobe, exclude_self=exclude_self, query_rows=rows)
        recall = ivf_switch.edge_recall(edges, I_rows)
        log.info(
            "IVF nprobe %d of %d lists: recall %.4f of %d checked edges (target %.4f)",
            nprobe,
            plan.nlist,
            recall,
            len(edges[0]),
            ivf_switch.RECALL_TARGET,
        )
        if recall >= ivf_switch.RECALL_TARGET or nprobe >= plan.nlist:
            return search_ivf(index, xq, k, nprobe, exclude_self=exclude_self)
        nprobe = min(plan.nlist, 2 * nprobe)


def build_ivf(xb, plan: KnnPlan, *, metric: str = "ip", device="cpu", seed: int = 0):
    """A trained Faiss inverted-file index of `plan.factory` holding every row of `xb`."""
    import faiss

    xb = _as_f32(xb)
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    index = faiss.index_factory(xb.shape[1], plan.factory, faiss_metric)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    ivf.cp.min_points_per_centroid = 1  # small pools train on every row they have; no warning
    rng = np.random.default_rng(seed)
    n_train = min(len(xb), plan.nlist * IVF_TRAIN_PER_LIST)
    train = xb if n_train == len(xb) else xb[np.sort(rng.choice(len(xb), n_train, replace=False))]
    engine = FaissBackend(device)
    if engine.use_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), engine.device.index or 0, index)
    index.train(train)
    index.add(xb)
    return index


def search_ivf(
    index, xq, k: int, nprobe: int, *, exclude_self: bool = False, query_rows=None, query_batch: int = 16384
):
    """(D, I) of `index` for every row of `xq`, visiting `nprobe` lists; `exclude_self` drops each
    query's own row from its neighbours (the queries are indexed rows: `query_rows`, else 0..n-1)."""
    import faiss
    from tqdm.auto import tqdm

    xq = _as_f32(xq)
    metric = "ip" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"
    on_gpu = hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", int(nprobe))
    available = index.ntotal - (1 if exclude_self else 0)
    kk = min(k, available)
    D, I = _empty_result(len(xq), k, metric)
    if kk <= 0:
        return D, I
    extra = 1 if exclude_self else 0
    for start in tqdm(range(0, len(xq), query_batch), desc="ivf search", leave=False, disable=None):
        stop = min(start + query_batch, len(xq))
        d, i = index.search(xq[start:stop], kk + extra)
        if exclude_self:
            own = np.arange(start, stop) if query_rows is None else np.asarray(query_rows)[start:stop]
            d, i = _drop_self(d, i, own)
        D[start:stop, :kk], I[start:stop, :kk] = d, i
    # IVF leaves -1 where fewer than k rows were probed; give those the "missing" score.
    missing = I < 0
    D[missing] = -np.inf if metric == "ip" else np.inf
    return D, I


def ivf_search(
    xb,
    xq,
    k: int,
    plan: KnnPlan,
    *,
    metric: str = "ip",
    exclude_self: bool = False,
    device="cpu",
    seed: int = 0,
    query_batch: int = 16384,
):
    """Approximate search with a Faiss inverted-file index built for this call (unchecked)."""
    index = build_ivf(xb, plan, metric=metric, device=device, seed=seed)
    return search_ivf(index, xq, k, plan.nprobe, exclude_self=exclude_self, query_batch=query_batch)


__all__ = ["KnnPlan", "plan_knn", "knn_graph", "search", "ivf_search", "build_ivf", "search_ivf"]
