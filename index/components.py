"""Duplicate groups: thresholded similarity graphs, their connected components, one kept per group.

Near-duplicate removal (DINOv2, section 3) links every pair of images whose cosine similarity
is at or above a threshold and keeps one image per connected component. Transitivity is wanted:
a chain of light edits (crop, then recompress, then resize) forms one group even when its two
ends are no longer close. Arrays in, arrays out; rows are referred to by their index.

Keep rule (`keep_one`): in every component the row with the highest priority is kept (the
dedup stage passes the pixel count, so the largest copy survives); ties go to the lowest row
index, and callers order rows by manifest id, so the result depends only on the data.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

# Similarity block held in memory at once by `pairs_above`, in float32 entries (256 MiB).
DEFAULT_BLOCK_ENTRIES = 1 << 26


def cells_at_least(scores: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) int64 of the entries of a 2-D block >= threshold, row-major order.

    Made for blocks with few hits: each row's largest entry first (one read, no mask written;
    fmax, so that a NaN hides no other entry), then one flat scan of the rows that reach the
    threshold. numpy's 2-D `nonzero` took ~9x longer than a flat scan on a (19k, 790) similarity
    block with few hits (37 ms, against 4 ms), more than the product that made the block; the row
    maxima take ~0.4x of a flat scan (1024 x 513 float32 block, 2-core AVX2 AMD EPYC)."""
    scores = np.asarray(scores)
    if scores.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    hot = np.flatnonzero(np.fmax.reduce(scores, axis=1) >= threshold)
    flat = np.flatnonzero(scores[hot].reshape(-1) >= threshold)
    rows, cols = np.divmod(flat, scores.shape[1])
    return hot[rows].astype(np.int64), cols.astype(np.int64)


def knn_edges(similarities: np.ndarray, neighbors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Edges (row, neighbour) of a k-NN graph whose similarity is >= threshold.

    `similarities`/`neighbors` are the n×k (D, I) of a k-NN graph with inner-product scores;
    missing neighbours (-1) are dropped.
    """
    similarities = np.asarray(similarities)
    neighbors = np.asarray(neighbors)
    mask = (similarities >= threshold) & (neighbors >= 0)
    rows, slots = np.nonzero(mask)
    return rows.astype(np.int64), neighbors[rows, slots].astype(np.int64)


def pairs_above(
    xq: np.ndarray,
    xb: np.ndarray,
    threshold: float,
    *,
    exclude_self: bool = False,
    block_entries: int = DEFAULT_BLOCK_ENTRIES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (query row, base row, similarity) with inner product >= threshold, exactly.

    Unlike a k-NN graph this misses no pair however many there are, which decontamination
    needs to be auditable. Queries go through in blocks so that at most `block_entries`
    similarities are held at once. With `exclude_self` (xq is xb) the diagonal is skipped.
    Output is sorted by query row, then base row.
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    if xq.ndim != 2 or xb.ndim != 2 or xq.shape[1] != xb.shape[1]:
        raise ValueError(f"xq {xq.shape} and xb {xb.shape} must be 2-D with the same width")
    block = max(1, block_entries // max(1, len(xb)))
    qs, bs, ss = [], [], []
    for start in range(0, len(xq), block):
        sims = xq[start : start + block] @ xb.T
        if exclude_self:
            diag = np.arange(sims.shape[0])
            cols = diag + start
            inside = cols < sims.shape[1]
            sims[diag[inside], cols[inside]] = -np.inf
        q, b = cells_at_least(sims, threshold)
        qs.append(q + start)
        bs.append(b)
        ss.append(sims[q, b].astype(np.float32))
    if not qs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(qs), np.concatenate(bs), np.concatenate(ss)


def connected_components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Component label of each of n nodes of the undirected graph with edges (rows, cols).

    Labels are renumbered so that component c is the one whose lowest node index is the c-th
    lowest: the numbering depends on the graph, not on the order edges were found in.
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    if n == 0:
        return np.zeros(0, np.int64)
    graph = scipy.sparse.coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n)).tocsr()
    _, labels = scipy.sparse.csgraph.connected_components(graph, directed=True, connection="weak")
    # First occurrence of each raw label, in node order, defines the new numbering.
    _, first = np.unique(labels, return_index=True)
    order = np.empty(len(first), np.int64)
    order[np.argsort(first)] = np.arange(len(first))
    return order[labels]


def keep_one(labels: np.ndarray, priority: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask keeping one row per label: highest priority, then lowest row index."""
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0:
        return np.zeros(0, bool)
    prio = np.zeros(n) if priority is None else np.asarray(priority, dtype=np.float64)
    order = np.lexsort((np.arange(n), -prio, labels))
    sorted_labels = labels[order]
    first = np.ones(n, bool)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    keep = np.zeros(n, bool)
    keep[order[first]] = True
    return keep


def star_groups(
    n: int, rows: np.ndarray, cols: np.ndarray, priority: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(group, keep) of n nodes: each kept node takes only its own direct neighbours, no chains.

    Nodes are visited in keep order (highest priority, then lowest index); a node no group
    has taken yet is kept, and its neighbours not yet taken join its group. The kept nodes are
    the greedy maximal independent set of the graph in that order, and every removed node is
    a direct neighbour of its group's kept node. Connected components instead merge chains
    of look-alikes (A~B~C with A far from C) into one group that keeps one image, which in
    an embedding that is not a copy-detector's can swallow hundreds of distinct images.
    Groups are numbered like `connected_components`, by their lowest node index.
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    graph = scipy.sparse.coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n)).tocsr()
    graph = (graph + graph.T).tocsr()
    prio = np.zeros(n) if priority is None else np.asarray(priority, dtype=np.float64)
    group = np.arange(n, dtype=np.int64)  # a node without edges is its own group
    keep = np.ones(n, bool)
    linked = np.flatnonzero(np.diff(graph.indptr) > 0)
    taken = np.zeros(n, bool)
    indptr, indices = graph.indptr, graph.indices
    for node in linked[np.lexsort((linked, -prio[linked]))]:
        if taken[node]:
            continue
        taken[node] = True
        members = indices[indptr[node] : indptr[node + 1]]
        members = members[~taken[members]]
        taken[members] = True
        group[members] = node
        keep[members] = False
    _, first = np.unique(group, return_index=True)
    renumber = np.zeros(n, np.int64)
    renumber[group[np.sort(first)]] = np.arange(len(first))
    return renumber[group], keep


GROUPINGS = ("components", "star")


def group_duplicates(
    n: int, rows: np.ndarray, cols: np.ndarray, priority: np.ndarray | None = None, grouping: str = "components"
) -> tuple[np.ndarray, np.ndarray]:
    """(group, keep) of n nodes linked by the edges (rows, cols): `components` (DINOv2) or `star`."""
    if grouping == "components":
        labels = connected_components(n, rows, cols)
        return labels, keep_one(labels, priority)
    if grouping == "star":
        return star_groups(n, rows, cols, priority)
    raise ValueError(f"grouping must be one of {', '.join(GROUPINGS)}, got {grouping!r}")


def duplicate_groups(
    similarities: np.ndarray,
    neighbors: np.ndarray,
    threshold: float,
    priority: np.ndarray | None = None,
    grouping: str = "components",
) -> tuple[np.ndarray, np.ndarray]:
    """(group, keep) of every row of a k-NN graph thresholded at `threshold`."""
    rows, cols = knn_edges(similarities, neighbors, threshold)
    return group_duplicates(len(similarities), rows, cols, priority, grouping)
