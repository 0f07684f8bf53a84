"""Near-duplicate groups of a set of vectors: which rows are copies of each other, and which one
of each group is kept.

Three ways to find the pairs at or above a cosine threshold, each ending in the same grouping
(`index.components.group_duplicates`: connected components, or stars around kept rows):
- `near_duplicates_knn`: the k-NN graph in memory (DINOv2's way), exact or IVF;
- `near_duplicates_join`: inverted lists joined list by list (`index.ivf_join`), reading the rows
  from a view, for pools past the memory budget or past the exact graph's crossover;
- `near_duplicates_semdedup`: all pairs inside each spherical k-means cluster (SemDeDup).
Arrays (or an `index.io.EmbeddingRows` view) in, (component, keep) arrays out.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from lvd.common.devices import resolve_device
from lvd.common.ranks import Ranks
from lvd.index import ivf_join, ivf_switch
from lvd.index.components import duplicate_groups, group_duplicates, pairs_above
from lvd.index.kmeans import kmeans
from lvd.index.knn import EXACT_MAX_ACCELERATOR, knn_graph

# SemDeDup without a cluster count: about this many images per cluster.
SEMDEDUP_CLUSTER_SIZE = 1000


def near_duplicates_knn(
    x: np.ndarray,
    priority: np.ndarray,
    *,
    k: int,
    threshold: float,
    backend: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    grouping: str = "components",
) -> tuple[np.ndarray, np.ndarray]:
    """(component, keep) per row from the k-NN graph thresholded at `threshold` (DINOv2).

    The graph is exact for small pools and IVF past the exact/IVF crossover measured on this
    machine (`index.ivf_switch`), checked to keep the edges at or above the threshold; edges below
    it are dropped before the grouping (`index.components.group_duplicates`).
    """
    if len(x) < 2:
        return np.arange(len(x), dtype=np.int64), np.ones(len(x), bool)
    sims, neighbors = knn_graph(
        x, min(k, len(x) - 1), backend=backend, device=device, seed=seed, min_similarity=threshold
    )
    return duplicate_groups(sims, neighbors, threshold, priority, grouping)


def exact_graph_pays(n: int, d: int, k: int, device: str, budget: int) -> bool:
    """Whether the in-memory k-NN graph beats the list join for n rows.

    Both are matrix products at the same rate: an exact graph costs n^2 d, the join about
    n (nprobe LIST_SIZE + CHECK_QUERIES) d with nprobe up to 16, so a CPU searches exactly up to
    ~9k rows; an accelerator's tensor cores make n^2 affordable up to EXACT_MAX_ACCELERATOR. Past
    the memory budget (the float32 rows, the index and the graph) the join is the only way.
    """
    in_memory = n * (8 * d + 12 * k)
    if in_memory > budget:
        return False
    if resolve_device(device).type != "cpu":
        return n <= EXACT_MAX_ACCELERATOR
    return n <= ivf_join.PROBE_WIDTHS[0] * ivf_join.LIST_SIZE + ivf_switch.CHECK_QUERIES


def near_duplicates_join(
    view,
    priority: np.ndarray,
    *,
    k: int,
    threshold: float,
    budget: int,
    backend: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    grouping: str = "components",
    progress: bool = False,
    ranks: Ranks | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(component, keep, join report) of the rows of an `EmbeddingRows` view, read from the parts
    list group by list group (`index.ivf_join`): memory holds a few bytes per row, not the rows.
    Under torchrun every rank joins its share of the lists; rank 0 gets the groups."""
    rows, cols, report = ivf_join.near_pairs(
        view,
        threshold,
        k,
        memory_budget=budget,
        seed=seed,
        backend=backend,
        device=device,
        spanning=grouping == "components",
        progress=progress,
        ranks=ranks,
    )
    component, keep = group_duplicates(len(view), rows, cols, priority, grouping)
    return component, keep, report.record()


def near_duplicates_semdedup(
    x: np.ndarray,
    priority: np.ndarray,
    *,
    threshold: float,
    clusters: int | None,
    niter: int = 20,
    seed: int = 0,
    backend: str = "auto",
    device: str = "cpu",
    progress: bool = False,
    grouping: str = "components",
) -> tuple[np.ndarray, np.ndarray]:
    """(component, keep) per row from all pairs >= threshold inside each spherical k-means cluster.

    SemDeDup (Abbas et al. 2023) compares only images of the same cluster, which makes all
    pairs affordable; pairs that k-means separates are not linked.
    """
    n = len(x)
    if n < 2:
        return np.arange(n, dtype=np.int64), np.ones(n, bool)
    k = int(clusters or max(1, round(n / SEMDEDUP_CLUSTER_SIZE)))
    k = max(1, min(k, n))
    assign = kmeans(x, k, niter=niter, seed=seed, spherical=True, backend=backend, device=device).assign
    rows, cols = [], []
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(k + 1))
    for c in tqdm(range(k), desc="semdedup", unit="cluster", disable=not progress):
        members = order[bounds[c] : bounds[c + 1]]
        if len(members) < 2:
            continue
        q, b, _ = pairs_above(x[members], x[members], threshold, exclude_self=True)
        rows.append(members[q])
        cols.append(members[b])
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    return group_duplicates(n, rows, cols, priority, grouping)
