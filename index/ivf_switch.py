"""When a k-NN job leaves exact search for an IVF index, and proof that the IVF graph is good enough.

Exact search costs n^2 d; an IVF index with nlist ~ sqrt(n) lists costs about n^1.5 d, with a
larger constant (training, list scans). Where the two meet depends on the machine (BLAS speed,
cores, SIMD width), so it is measured, not written down: `measured_exact_max` times an exact
graph and IVF graphs on samples of the job's own rows, fits IVF's growth, and solves for the
row count where IVF becomes cheaper. The timings are cached per machine
(`lvd.common.calibration`).

Speed is not enough: `check_edges` compares the IVF neighbours of a sample of rows with an
exact search of the same rows against the whole base. Edges that matter are those at or above
the caller's similarity threshold (near-duplicates); where a sample holds too few, every
sample's MIN_CHECK_EDGES most similar pairs stand in (the pairs most like near-duplicates).
`knn.knn_graph` raises nprobe until the recall reaches `RECALL_TARGET`.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np

from lvd.common.calibration import timings
from lvd.index.backend_choice import _sample

log = logging.getLogger(__name__)

#: rows of the exact and the two IVF calibration graphs (IVF's growth is fitted between them)
CALIBRATION_ROWS = (8192, 16384)
#: recall of near-duplicate edges against exact search that an IVF graph must reach
RECALL_TARGET = 0.999
#: rows whose IVF neighbours are checked against an exact search of the whole base
CHECK_QUERIES = 1024
#: fewer threshold edges than this in the checked rows: their nearest neighbours are checked instead
MIN_CHECK_EDGES = 50


def crossover_rows(
    exact_seconds: float, exact_rows: int, ivf_seconds: tuple[float, float], ivf_rows: tuple[int, int]
) -> float:
    """Rows where exact (t = a n^2) and IVF (t = c n^b, b fitted from two sizes) cost the same."""
    (t1, t2), (m1, m2) = ivf_seconds, ivf_rows
    b = math.log(t2 / t1) / math.log(m2 / m1) if t1 > 0 and t2 > 0 and m2 != m1 else 1.5
    b = min(max(b, 1.0), 1.95)  # IVF never grows slower than linear, and must stay below exact's n^2
    a = exact_seconds / exact_rows**2
    c = t1 / m1**b
    return (c / a) ** (1.0 / (2.0 - b))


def _exact_graph(engine, rows, k, metric):
    return engine.search(rows, rows, k, metric=metric, exclude_self=True)


def measured_exact_max(
    x: np.ndarray, k: int, exact_engine, ivf_graph, *, metric: str = "ip", seed: int = 0, measure=None
) -> int:
    """The largest pool worth searching exactly here: below it exact search is faster than IVF.

    `ivf_graph(rows, k)` builds the k-NN graph of `rows` the way the job's IVF plan would;
    `exact_engine` is the engine exact search would use. Pools smaller than the calibration's
    largest sample are never measured (they are searched exactly).
    """
    m1, m2 = CALIBRATION_ROWS
    if len(x) <= m2:
        return m2
    small, large = _sample(x, m1, seed), _sample(x, m2, seed + 1)
    kk = min(k, m1 - 1)
    jobs = {
        "exact": functools.partial(_exact_graph, exact_engine, small, kk, metric),
        "ivf-small": functools.partial(ivf_graph, small, kk),
        "ivf-large": functools.partial(ivf_graph, large, kk),
    }
    shape = {
        "rows": CALIBRATION_ROWS,
        "d": int(x.shape[1]),
        "k": int(kk),
        "metric": metric,
        "exact_engine": f"{exact_engine.name}-{getattr(exact_engine, 'dtype', '')}",
    }
    seconds, cached = timings(
        "exact/IVF crossover", shape, jobs, device=exact_engine.device, repeats=1, measure=measure
    )
    rows = crossover_rows(seconds["exact"], m1, (seconds["ivf-small"], seconds["ivf-large"]), (m1, m2))
    exact_max = int(min(max(rows, m2), 2**62))
    log.info(
        "exact/IVF crossover at %d rows (exact %.0f ms at %d rows; IVF %.0f ms at %d, %.0f ms at %d; %s)",
        exact_max,
        seconds["exact"] * 1e3,
        m1,
        seconds["ivf-small"] * 1e3,
        m1,
        seconds["ivf-large"] * 1e3,
        m2,
        "cached measurement" if cached else "measured now",
    )
    return exact_max


def check_rows(n: int, seed: int = 0) -> np.ndarray:
    """The rows whose IVF neighbours are checked (sorted)."""
    if n <= CHECK_QUERIES:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, CHECK_QUERIES, replace=False))


def check_edges(
    D_exact: np.ndarray, I_exact: np.ndarray, min_similarity: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """(query position, neighbour id) of the edges a checked row must keep: its exact neighbours at
    or above `min_similarity`; where the rows hold fewer than MIN_CHECK_EDGES of them, the
    MIN_CHECK_EDGES most similar edges of all checked rows (the pairs most like near-duplicates);
    without a `min_similarity` (distances), each checked row's nearest neighbour."""
    valid = I_exact >= 0
    if min_similarity is None:
        q = np.flatnonzero(valid[:, 0])
        return q, I_exact[q, 0]
    q, j = np.nonzero((D_exact >= min_similarity) & valid)
    if len(q) < MIN_CHECK_EDGES:
        q, j = np.nonzero(valid)
        best = np.argsort(-D_exact[q, j], kind="stable")[:MIN_CHECK_EDGES]
        q, j = q[np.sort(best)], j[np.sort(best)]
    return q, I_exact[q, j]


def edge_recall(edges: tuple[np.ndarray, np.ndarray], I_approx: np.ndarray) -> float:
    """Share of `edges` (query position, id) whose id is among that query's approximate neighbours."""
    q, j = edges
    if len(q) == 0:
        return 1.0
    found = (I_approx[q] == j[:, None]).any(1)
    return float(found.mean())


__all__ = [
    "measured_exact_max",
    "crossover_rows",
    "check_rows",
    "check_edges",
    "edge_recall",
    "RECALL_TARGET",
    "CALIBRATION_ROWS",
    "CHECK_QUERIES",
]
