"""Near-duplicate pairs of a pool larger than memory: an inverted-file self-join, list by list.

Every row is assigned to its nearest list (a k-means centroid; two levels of centroids past
FLAT_MAX_LISTS lists, so that assigning a row costs ~sqrt(nlist) products, not nlist) and
probes the lists whose centroids score within a margin of its nearest one's (at most
PROBE_WIDTHS[-1] of them): a row deep inside its list probes one or two, a row on a border
more, where a fixed nprobe gives every row the border rows' count. For each list, the rows
that probe it are compared with the rows assigned to it by one matrix product, and the pairs
at or above the threshold are kept with their exact float32 cosines. A pair (i, j) is compared
when j's list is among i's probes or i's among j's, so whether an edge can be found depends on
the assignments only (`linked`): `choose_margin` measures it on the exact near-duplicates of a
sample of rows and on copies of them at the threshold, and uses the smallest margin of MARGINS
that compares RECALL_TARGET of them. On scale.py's synthetic pool (1M rows, 1953
lists, 2-core AVX2 AMD EPYC) the margin reached 0.99 of the copies at ~9 probes a row on
average where a fixed nprobe needed 16.

Why not a Faiss IVF search: an IVF index holds the vectors (float32: 15 GB at 10M x 384; SQ8
codes 3.8 GB) and scans lists query by query; here the float16 parts on disk are the storage
(read into memory once where they take at most a HELD_SHARE of the budget), a group of lists
is read at a time, and each list is one BLAS product. With lists of ~LIST_SIZE rows the join
costs n * nprobe * LIST_SIZE * d (nprobe: the mean probes a row), linear in n while nprobe
stays put. `benchmarks/scale.py --faiss` compares it with Faiss's IVF-Flat on the same lists.

Arrays in, arrays out; rows are positions in the view.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from threadpoolctl import threadpool_info, threadpool_limits
from tqdm.auto import tqdm

from lvd.index import ivf_switch
from lvd.index.components import cells_at_least
from lvd.index.kmeans import kmeans

log = logging.getLogger(__name__)

#: rows per inverted list aimed at (the join's cost per row is nprobe * LIST_SIZE * d)
LIST_SIZE = 512
#: up to this many lists every row is scored against every centroid; above, two levels
FLAT_MAX_LISTS = 16384
#: sample rows per list that train the centroids
TRAIN_PER_LIST = 24
#: top-level cells whose lists a row is scored against (two-level assignment)
TOP_PROBE = 8
#: the most lists a row may probe: the last where the memory budget holds its probes, else the first
PROBE_WIDTHS = (24, 32)
#: probe margins tried, smallest first (cosine below the nearest list's score; 2 takes every stored probe)
MARGINS = tuple(round(0.005 * i, 3) for i in range(25)) + (0.15, 0.2, 0.3, 0.5, 2.0)
#: Lloyd steps over all lists after the two-level training
REFINE_ITERS = 1
#: share of the copies at exactly the threshold (the worst case: every near-duplicate is at or above
#: it) that the join must compare; the sample's real near-duplicates must reach ivf_switch.RECALL_TARGET
COPY_RECALL_TARGET = 0.99
#: k-means iterations of the centroids (they only partition the space; the join is exact)
QUANTIZER_NITER = 10
#: the join reads its rows from memory when they take at most memory_budget / HELD_SHARE (`EmbeddingRows.held`)
HELD_SHARE = 3
#: query rows multiplied at a time: their products (x LIST_SIZE members) stay in the L2/L3 cache for the scan
JOIN_CHUNK = 1024


@dataclass
class Quantizer:
    """The lists' centroids; with two levels, `top` centroids own consecutive runs of them."""

    centroids: np.ndarray  # (nlist, d) float32
    top: np.ndarray | None = None  # (T, d) float32, None when flat
    bounds: np.ndarray | None = None  # (T + 1,) lists of top cell t: bounds[t]:bounds[t + 1]

    @property
    def nlist(self) -> int:
        return len(self.centroids)


def list_count(n: int) -> int:
    """Lists for n rows: ~LIST_SIZE rows each, larger past ~4M rows, where n / LIST_SIZE lists
    would make the assignment (n * nlist * d) cost more than the join (n * nprobe * size * d)."""
    size = max(LIST_SIZE, math.sqrt(n / 16))
    return max(1, min(n // 4, round(n / size)))


def train_quantizer(sample: np.ndarray, nlist: int, *, seed: int = 0, backend="auto", device="cpu") -> Quantizer:
    """Centroids of `nlist` lists from a sample of rows: one spherical k-means, or a top level of
    ~sqrt(nlist) cells each split in proportion to its share of the sample."""
    sample = np.ascontiguousarray(sample, np.float32)
    nlist = max(1, min(nlist, len(sample)))
    common = dict(niter=QUANTIZER_NITER, spherical=True, backend=backend, device=device)
    if nlist <= FLAT_MAX_LISTS:
        return Quantizer(kmeans(sample, nlist, seed=seed, **common).centroids)
    n_top = max(2, round(math.sqrt(nlist)))
    top = kmeans(sample, n_top, seed=seed, **common)
    sizes = np.bincount(top.assign, minlength=n_top)
    share = np.maximum(1, np.round(nlist * sizes / len(sample))).astype(np.int64)
    share = np.minimum(share, np.maximum(sizes, 1))
    centroids, counts = [], []
    for t in range(n_top):
        members = sample[top.assign == t]
        if len(members) == 0:  # an empty top cell keeps its own centroid as its only list
            centroids.append(top.centroids[t : t + 1])
        else:
            centroids.append(kmeans(members, int(min(share[t], len(members))), seed=seed + 1 + t, **common).centroids)
        counts.append(len(centroids[-1]))
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    quantizer = Quantizer(np.concatenate(centroids).astype(np.float32), top.centroids.astype(np.float32), bounds)
    for _ in range(REFINE_ITERS):  # Lloyd steps over all lists at once: cells as flat k-means would draw them
        assign = nearest_lists(sample, quantizer, 1)[:, 0]
        sums = np.zeros_like(quantizer.centroids, dtype=np.float64)
        np.add.at(sums, assign, sample)
        used = np.bincount(assign, minlength=quantizer.nlist) > 0
        sums[used] /= np.linalg.norm(sums[used], axis=1, keepdims=True)
        quantizer.centroids[used] = sums[used].astype(np.float32)
    return quantizer


def nearest_lists(x: np.ndarray, quantizer: Quantizer, nprobe: int, *, scores: bool = False):
    """(len(x), nprobe) int32 lists of each row, nearest first (by inner product); with `scores`,
    also their (len(x), nprobe) float32 scores (-inf where two levels scored fewer lists)."""
    x = np.ascontiguousarray(x, np.float32)
    nprobe = min(nprobe, quantizer.nlist)
    if quantizer.top is None:  # Faiss's blocked product and heaps: no (rows, nlist) score block is held
        D, I = faiss.knn(x, quantizer.centroids, nprobe, metric=faiss.METRIC_INNER_PRODUCT)
        return (I.astype(np.int32), D) if scores else I.astype(np.int32)
    bounds = quantizer.bounds
    width = int(np.diff(bounds).max())
    tp = min(TOP_PROBE, len(quantizer.top))
    cells = _top_columns(x @ quantizer.top.T, np.arange(len(quantizer.top)), tp)[0]  # (B, tp)
    block = np.full((len(x), tp * width), -np.inf, np.float32)
    lists = np.zeros((len(x), tp * width), np.int64)
    for t in np.unique(cells):
        rows, slot = np.nonzero(cells == t)
        own = np.arange(bounds[t], bounds[t + 1])
        cols = slot[:, None] * width + np.arange(len(own))
        block[rows[:, None], cols] = x[rows] @ quantizer.centroids[own].T
        lists[rows[:, None], cols] = own
    picked, best = _top_columns(block, lists, nprobe)
    return (picked, best) if scores else picked


def _top_columns(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of each row's k best scores, best first (`ids` one row for all, or per row).

    torch's top-k runs on every core; numpy's argpartition of a block's scores took longer than
    the product itself (benchmarks/list_assign.py)."""
    k = min(k, scores.shape[1])
    values, best = torch.topk(torch.from_numpy(np.ascontiguousarray(scores)), k, dim=1, sorted=True)
    best = best.numpy()
    picked = ids[best] if ids.ndim == 1 else np.take_along_axis(ids, best, 1)
    return picked.astype(np.int32), values.numpy()


def list_dtype(nlist: int) -> np.dtype:
    """The narrowest integer that numbers `nlist` lists (and -1, a probe not taken): the probes
    are n * PROBE_WIDTHS[-1] of them."""
    return np.dtype(np.int16 if nlist <= np.iinfo(np.int16).max + 1 else np.int32)


def probe_lists(
    view, quantizer: Quantizer, nprobe: int, *, block_rows: int = 16384, progress: bool = False, gaps: bool = False
):
    """(n, nprobe) nearest lists of every row of `view` (`list_dtype`), read block by block; with
    `gaps`, also (n, nprobe) float16 how far below the row's nearest list's score each one's is
    (the margin that `within_margin` compares)."""
    width = min(nprobe, quantizer.nlist)
    out = np.empty((len(view), width), list_dtype(quantizer.nlist))
    below = np.empty((len(view), width), np.float16) if gaps else None
    for start, block in tqdm(
        view.blocks(block_rows),
        total=math.ceil(len(view) / block_rows),
        desc="assign lists",
        unit="block",
        disable=not progress,
    ):
        lists, scores = nearest_lists(block, quantizer, nprobe, scores=True)
        out[start : start + len(block)] = lists
        if below is not None:
            below[start : start + len(block)] = np.minimum(scores[:, :1] - scores, np.finfo(np.float16).max)
    return (out, below) if gaps else out


def within_margin(probes: np.ndarray, gaps: np.ndarray, margin: float) -> np.ndarray:
    """The probes whose gap is at most `margin`, -1 in place of the others, without the columns
    no row reaches. A row's gaps grow along it (its lists nearest first), so its probes are a prefix."""
    taken = gaps <= np.float16(margin)
    width = max(1, int(taken.sum(1).max())) if len(probes) else 1
    out = np.where(taken[:, :width], probes[:, :width], -1).astype(probes.dtype)
    out[:, 0] = probes[:, 0]  # its own list, whatever the margin
    return out


def linked(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether the join compares row pairs whose probes are a[e] and b[e] (-1: no probe): one's
    list (first probe) is among the other's probes."""
    return (a == b[:, :1]).any(1) | (b == a[:, :1]).any(1)


def exact_neighbors(
    view, rows: np.ndarray, k: int, *, threshold: float, block_rows: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """(D, I) of the k most similar other rows of `view` at or above `threshold` for each of
    `rows`, exactly, in one pass over blocks, best first; a row with fewer keeps -inf and -1 in
    its last places. Each block is scanned for the few cells that reach the threshold
    (`cells_at_least`) instead of merged whole into a top-k: at 3M rows that merge took more of
    the margin check's pass than the product."""
    q = view[rows]
    k = min(k, len(view) - 1)
    found = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))]  # (row, column, score)
    for start, block in view.blocks(block_rows):
        sims = q @ block.T
        own = (rows >= start) & (rows < start + len(block))
        sims[np.flatnonzero(own), rows[own] - start] = -np.inf
        a, b = cells_at_least(sims, threshold)
        found.append((a, b + start, sims[a, b]))
        if sum(len(f[0]) for f in found) > 4 * k * len(rows):  # a pool of copies: each row's best k so far
            found = [_best_per_row(*map(np.concatenate, zip(*found)), k)]
    a, i, d = _best_per_row(*map(np.concatenate, zip(*found)), k)
    slot = np.arange(len(a)) - np.searchsorted(a, a)  # a's are sorted: the place among its row's kept
    D = np.full((len(rows), k), -np.inf, np.float32)
    I = np.full((len(rows), k), -1, np.int64)
    D[a, slot], I[a, slot] = d, i
    return D, I


def _best_per_row(a: np.ndarray, i: np.ndarray, d: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """The cells (row a, column i, score d) with each row's k best scores, by row, best first."""
    order = np.lexsort((-d, a))
    a, i, d = a[order], i[order], d[order]
    keep = np.arange(len(a)) - np.searchsorted(a, a) < k
    return a[keep], i[keep], d[keep]


def threshold_copies(x: np.ndarray, threshold: float, seed: int = 0) -> np.ndarray:
    """A copy of each row at cosine exactly `threshold`, moved in a random direction: the
    hardest near-duplicate the threshold still links."""
    rng = np.random.default_rng(seed)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)  # stored float16 rows are unit to ~1e-3
    u = rng.standard_normal(x.shape).astype(np.float32)
    u -= (u * x).sum(1, keepdims=True) * x
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    t = float(np.clip(threshold, -1.0, 1.0))
    return (t * x + math.sqrt(1.0 - t * t) * u).astype(np.float32)


def choose_margin(
    view, probes: np.ndarray, gaps: np.ndarray, quantizer: Quantizer, threshold: float, k: int, *, seed: int = 0
) -> tuple[float, float, float, int]:
    """(margin, recall of real edges, recall of threshold copies, edges checked): the smallest
    margin of MARGINS whose join compares RECALL_TARGET of the real edges and COPY_RECALL_TARGET
    of the copies (`probes`, `gaps`: `probe_lists`' of every row).

    The checked edges are the exact neighbours at or above the threshold of
    `ivf_switch.check_rows` (an exact pass over the pool), and, for each checked row, a copy
    at exactly the threshold (`threshold_copies`): a random sample of a pool holds few
    near-duplicates, and the next most similar pairs of a sample are not near-duplicates
    (in a clustered space, the join does not need to compare them).
    """
    rows = ivf_switch.check_rows(len(view), seed)
    x = view[rows]
    D, I = exact_neighbors(view, rows, k, threshold=threshold)
    q, j = np.nonzero((D >= threshold) & (I >= 0))
    width = probes.shape[1]
    copies, copy_scores = nearest_lists(threshold_copies(x, threshold, seed), quantizer, width, scores=True)
    copy_gaps = copy_scores[:, :1] - copy_scores
    checked = len(q) + len(rows)
    recall = planted_recall = 1.0
    margin = MARGINS[-1]
    for margin in MARGINS:
        real = linked(
            within_margin(probes[rows[q]], gaps[rows[q]], margin), within_margin(probes[I[q, j]], gaps[I[q, j]], margin)
        )
        mine = within_margin(probes[rows], gaps[rows], margin)
        theirs = within_margin(copies, copy_gaps, margin)
        recall = float(real.mean()) if len(q) else 1.0
        planted_recall = float(linked(mine, theirs).mean())
        log.info(
            "list join margin %.3f: compares %.4f of %d exact neighbours >= %.3g (target %.4f) and %.4f of %d "
            "copies at it (target %.4f)",
            margin,
            recall,
            len(q),
            threshold,
            ivf_switch.RECALL_TARGET,
            planted_recall,
            len(rows),
            COPY_RECALL_TARGET,
        )
        if recall >= ivf_switch.RECALL_TARGET and planted_recall >= COPY_RECALL_TARGET:
            return margin, recall, planted_recall, checked
    log.warning(
        "list join: %d probes compare only %.4f of the exact neighbours and %.4f of the copies (targets %.4f, %.4f)",
        width,
        recall,
        planted_recall,
        ivf_switch.RECALL_TARGET,
        COPY_RECALL_TARGET,
    )
    return margin, recall, planted_recall, checked


def _inverted(lists: np.ndarray, nlist: int, map_=map) -> tuple[np.ndarray, np.ndarray]:
    """(rows by list, bounds): the rows of list L are rows[bounds[L]:bounds[L + 1]], int32 where
    they fit, built column by column (a counting sort) so that the temporaries are one column's;
    `map_` (a thread pool's) places the columns side by side. A -1 (a probe not taken) puts its
    row in no list."""
    n, p = lists.shape
    by_column = np.ascontiguousarray(lists.T)  # each column's passes below read contiguous memory
    counts = np.zeros((nlist, p), np.int64)
    for c, column in enumerate(by_column):
        counts[:, c] = np.bincount(column[column >= 0], minlength=nlist)
    starts = np.concatenate([[0], np.cumsum(counts.ravel())])
    rows = np.empty(int(starts[-1]), np.int32 if n < 2**31 else np.int64)

    def place(c: int) -> None:
        column = by_column[c]
        taken = np.flatnonzero(column >= 0)  # a margin's late columns are mostly -1: only the probes taken are sorted
        order = taken[np.argsort(column[taken], kind="stable")]
        sorted_lists = column[order].astype(np.int64)
        first = np.cumsum(counts[:, c]) - counts[:, c]  # where each list's run begins in `order`
        rows[starts[sorted_lists * p + c] + np.arange(len(order)) - first[sorted_lists]] = order

    list(map_(place, range(p)))
    return rows, starts[::p]


def join_lists(
    view,
    probes: np.ndarray,
    nprobe: int,
    threshold: float,
    *,
    k: int,
    nlist: int,
    block_bytes: int = 1 << 28,
    lists: range | None = None,
    progress: bool = False,
    workers: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(i, j, cosine) of every compared pair at or above `threshold`, a group of lists at a time
    (`lists`: only those, e.g. one rank's share), in list order. A row is a member of its first
    probe's list and a query of each of its first `nprobe` probes' lists (-1: none, as
    `within_margin` leaves them).

    Each row keeps at most `k` partners per list (its best), as a k-NN graph would; a pair may be
    given twice (found from both sides).

    A group's rows are read once (float32) into one reused buffer, and find their place in it
    through one int32 map over all rows, not a search per list. The group's lists then go to `workers` threads
    (default: the threads numpy's BLAS would use for one product), each multiplying whole lists
    with a one-thread BLAS (`_list_join`): one list's gathers and threshold scan run beside
    another's product, where a product spread over every core left all but one idle during them.
    """
    workers = max(1, blas_threads() if workers is None else int(workers))
    with ThreadPoolExecutor(workers) as pool, threadpool_limits(1 if workers > 1 else None, user_api="blas"):
        members, m_bounds = _inverted(probes[:, :1], nlist)
        queries, q_bounds = _inverted(probes[:, :nprobe], nlist, pool.map)
        row_bytes = 4 * view.dim
        lists = range(nlist) if lists is None else lists
        start, end = lists.start, lists.stop
        place = np.zeros(len(probes), np.int64 if len(probes) >= 2**31 else np.int32)  # row -> its place in the group
        wanted = np.zeros(len(probes), bool)
        scratch = _Scratch(view.dim, int(np.diff(m_bounds).max()) if nlist else 0)
        buffer = np.empty(0, np.float32)  # the group's rows, reused from group to group (`EmbeddingRows.read`)
        bar = tqdm(total=len(lists), desc="join lists", unit="list", disable=not progress)
        while start < end:
            stop, size = start, 0
            while stop < end and (stop == start or size < block_bytes):
                size += row_bytes * (m_bounds[stop + 1] - m_bounds[stop] + q_bounds[stop + 1] - q_bounds[stop])
                stop += 1
            wanted[members[m_bounds[start] : m_bounds[stop]]] = True
            wanted[queries[q_bounds[start] : q_bounds[stop]]] = True
            needed = np.flatnonzero(wanted)
            wanted[needed] = False
            place[needed] = np.arange(len(needed), dtype=place.dtype)
            if len(needed) * view.dim > len(buffer):
                buffer = np.empty(len(needed) * view.dim, np.float32)
            out = buffer[: len(needed) * view.dim].reshape(len(needed), view.dim)
            x = _read_rows(view, needed, out, pool, workers)

            def one(lst: int, x=x):
                base = members[m_bounds[lst] : m_bounds[lst + 1]]
                query = queries[q_bounds[lst] : q_bounds[lst + 1]]
                return _list_join(x, place, query, base, threshold, k, scratch)

            # every list of the group is finished before the next group's rows overwrite `buffer`
            found = map(one, range(start, stop)) if workers == 1 else pool.map(one, range(start, stop))
            for pairs in found:
                if pairs is not None:
                    yield pairs
            bar.update(stop - start)
            start = stop
        bar.close()


def _read_rows(view, rows: np.ndarray, out: np.ndarray, pool: ThreadPoolExecutor, workers: int) -> np.ndarray:
    """`view.read(rows, out=out)`, a share of the rows on each thread (converted, pages faulted)."""
    bounds = np.linspace(0, len(rows), workers + 1).astype(np.int64)
    list(pool.map(lambda a, b: view.read(rows[a:b], out=out[a:b]), bounds[:-1], bounds[1:]))
    return out


def blas_threads() -> int:
    """The threads numpy's BLAS uses for one product (OPENBLAS_NUM_THREADS and the like included)."""
    counts = [lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return max(counts, default=1)


class _Scratch(threading.local):
    """One thread's reused blocks: a list's gathered members, JOIN_CHUNK gathered query rows and
    their products, so that no list allocates (and page-faults) fresh ones."""

    def __init__(self, dim: int, widest: int):
        self.members = np.empty((max(widest, 1), dim), np.float32)
        self.rows = np.empty((JOIN_CHUNK, dim), np.float32)
        self.scores = np.empty(JOIN_CHUNK * max(widest, 1), np.float32)


def _list_join(
    x: np.ndarray, place: np.ndarray, query: np.ndarray, base: np.ndarray, threshold: float, k: int, scratch
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(query rows, member rows, cosines) of one list's pairs at or above `threshold`, each query
    keeping its best `k`; None when there are none."""
    if len(base) == 0 or len(query) == 0:
        return None
    gathered = np.take(x, place[base], axis=0, out=scratch.members[: len(base)], mode="clip")
    # `_inverted` puts a list's members first among its queries, in the same order (column 0 comes first): their
    # self products are the diagonal of the first block, masked before the scan so that no member row looks hot
    own = len(base) if len(query) >= len(base) and np.array_equal(query[: len(base)], base) else 0
    a, b, s = _list_pairs(x, place[query], gathered, threshold, scratch, own=own)
    keep = query[a] != base[b]  # a query that is a member is not its own pair (whatever the order)
    a, b, s = a[keep], b[keep], s[keep]
    if len(a) == 0:
        return None
    if np.bincount(a).max() > k:
        a, b, s = _best_per_row(a, b, s, k)
    return query[a], base[b], s


def _list_pairs(
    x: np.ndarray, rows: np.ndarray, base: np.ndarray, threshold: float, scratch, *, own: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions in `rows`, positions in `base`, float32 products) of the products x[rows] @ base.T
    at or above `threshold`, in row-major order, leaving out (i, i) for i < `own` (rows that are
    `base` itself).

    `rows` go through `scratch.rows` a block at a time and the products into `scratch.scores`,
    which the threshold scan (`cells_at_least`) reads while they are still in cache."""
    step, m = len(scratch.rows), len(base)
    found_a, found_b, found_s = [], [], []
    for first in range(0, len(rows), step):
        count = min(step, len(rows) - first)
        gathered = scratch.rows[:count]
        # "clip": numpy's unbuffered take (the places are in range); with the default "raise" and out= it copies
        # through a temporary. A numpy gather: a torch one here left its OpenMP threads spinning against the BLAS.
        np.take(x, rows[first : first + count], axis=0, out=gathered, mode="clip")
        block = scratch.scores[: count * m].reshape(count, m)
        np.matmul(gathered, base.T, out=block)
        self_rows = np.arange(first, min(first + count, own))
        block[self_rows - first, self_rows] = -np.inf
        a, b = cells_at_least(block, threshold)
        if len(a) == 0:
            continue
        found_s.append(block[a, b])
        found_a.append(a + first)
        found_b.append(b)
    if not found_a:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    return np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_s)


class EdgeForest:
    """Edges gathered for connected components, compressed to a spanning forest when they grow
    past `max_edges`, so that memory stays a few bytes per row however many pairs are found."""

    def __init__(self, n: int, max_edges: int):
        self.n, self.max_edges = n, max(n, max_edges)
        self._rows: list[np.ndarray] = []
        self._cols: list[np.ndarray] = []
        self._count = 0

    def add(self, rows: np.ndarray, cols: np.ndarray) -> None:
        self._rows.append(np.asarray(rows, np.int64))
        self._cols.append(np.asarray(cols, np.int64))
        self._count += len(rows)
        if self._count > self.max_edges:
            self._compress()

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        rows, cols = np.concatenate(self._rows), np.concatenate(self._cols)
        self._rows, self._cols = [rows], [cols]
        return rows, cols

    def _compress(self) -> None:
        from lvd.index.components import connected_components

        labels = connected_components(self.n, *self.edges())
        first = np.full(labels.max() + 1, self.n, np.int64)
        np.minimum.at(first, labels, np.arange(self.n))
        linked = np.flatnonzero(first[labels] != np.arange(self.n))
        self._rows, self._cols = [linked], [first[labels[linked]]]
        self._count = len(linked)


@dataclass
class JoinReport:
    """How a join went: logged, and recorded in dedup's _SUCCESS.json."""

    rows: int
    nlist: int
    two_level: bool
    margin: float
    nprobe: int  # the most lists a row probes
    mean_probes: float
    recall: float
    copy_recall: float
    checked_edges: int
    pairs: int
    seconds: dict

    def record(self) -> dict:
        return {"method": "ivf-join", **self.__dict__}


def _shared(quantizer: Quantizer | None, ranks) -> Quantizer:
    """Rank 0's quantizer on every rank."""
    from lvd.common.ranks import broadcast_array

    if ranks.world == 1:
        return quantizer
    q = quantizer if ranks.rank == 0 else None
    centroids = broadcast_array(q.centroids if q else None, ranks)
    top = broadcast_array(
        (q.top if q.top is not None else np.zeros((0, centroids.shape[1]), np.float32)) if q else None, ranks
    )
    bounds = broadcast_array((q.bounds if q.bounds is not None else np.zeros(0, np.int64)) if q else None, ranks)
    return Quantizer(centroids, top if len(top) else None, bounds if len(bounds) else None)


def _trained_quantizer(view, seed: int, backend, device, ranks) -> Quantizer:
    """Rank 0 trains the lists on a seeded sample of the rows; every rank gets them."""
    quantizer = None
    if ranks.rank == 0:
        n = len(view)
        nlist = list_count(n)
        rng = np.random.default_rng(seed)
        train = np.sort(rng.choice(n, min(n, nlist * TRAIN_PER_LIST), replace=False))
        quantizer = train_quantizer(view[train], nlist, seed=seed, backend=backend, device=device)
    return _shared(quantizer, ranks)


def _all_probes(view, quantizer: Quantizer, memory_budget: int, progress: bool, ranks) -> tuple[np.ndarray, np.ndarray]:
    """Every row's nearest lists and their gaps, as many as the budget holds (each rank assigns its slice)."""
    from lvd.common.memory import rows_per_block
    from lvd.common.ranks import gather_rows, rank_slice

    n, d = len(view), view.dim
    # a block row's float32 vector, and with two levels its scores and list numbers over the
    # probed cells (flat, faiss.knn scores in its own small tiles)
    width = 1 if quantizer.bounds is None else int(np.diff(quantizer.bounds).max()) * TOP_PROBE
    block = rows_per_block(memory_budget, 4 * d + 12 * width)
    # per probe: its list, its gap, and its list again in `within_margin`'s copy
    per_probe = 2 * list_dtype(quantizer.nlist).itemsize + 2
    most = PROBE_WIDTHS[-1] if n * PROBE_WIDTHS[-1] * per_probe <= memory_budget // 8 else PROBE_WIDTHS[0]
    mine = view.subset(rank_slice(n, ranks))
    lists, gaps = probe_lists(mine, quantizer, most, block_rows=min(block, 65536), progress=progress, gaps=True)
    return gather_rows(lists, ranks), gather_rows(gaps, ranks)


def _joined(
    view, probes, nprobe: int, threshold: float, k: int, nlist: int, memory_budget: int, spanning: bool, progress, ranks
):
    """(i, j, pairs found) of this rank's share of the lists: a spanning forest of them with
    `spanning`, else every pair once (i < j); rank 0 gathers every rank's."""
    from lvd.common.ranks import gather_rows, rank_slice

    forest = EdgeForest(len(view), max_edges=int(memory_budget // 64)) if spanning else None
    found_i, found_j, pairs = [], [], 0
    share = rank_slice(nlist, ranks)
    lists = range(share.start, share.stop)
    budget = int(memory_budget // 8)
    for i, j, _ in join_lists(
        view, probes, nprobe, threshold, k=k, nlist=nlist, block_bytes=budget, lists=lists, progress=progress
    ):
        pairs += len(i)
        if forest is not None:
            forest.add(i, j)
        else:
            found_i.append(np.minimum(i, j))
            found_j.append(np.maximum(i, j))
    if forest is not None:
        rows, cols = forest.edges()
    elif found_i:
        rows, cols = np.concatenate(found_i), np.concatenate(found_j)
    else:
        rows = cols = np.zeros(0, np.int64)
    if ranks.world > 1:
        both = gather_rows(np.stack([rows, cols], 1).astype(np.int64), ranks)
        rows, cols = both[:, 0], both[:, 1]
        pairs = int(gather_rows(np.array([pairs], np.int64), ranks).sum())
    if not spanning and len(rows):
        both = np.unique(np.stack([rows, cols], 1), axis=0)
        rows, cols = both[:, 0], both[:, 1]
    return rows, cols, pairs


def near_pairs(
    view,
    threshold: float,
    k: int,
    *,
    memory_budget: int,
    seed: int = 0,
    backend="auto",
    device="cpu",
    spanning: bool = True,
    progress: bool = False,
    ranks=None,
) -> tuple[np.ndarray, np.ndarray, JoinReport]:
    """(i, j) pairs of rows of `view` at or above `threshold`, and the join's report.

    `spanning`: only the connected components of the pairs are wanted, so they are kept as a
    spanning forest (`EdgeForest`); otherwise every pair, each once (i < j).

    `ranks` (torchrun): rank 0 trains the lists and chooses the margin, every rank assigns its slice
    of the rows and joins its share of the lists, and rank 0 gets every pair (the others get
    none); the pairs are those one process finds.
    """
    import time

    from lvd.common.ranks import Ranks

    ranks = ranks or Ranks()
    times, started = {}, time.perf_counter()
    quantizer = _trained_quantizer(view, seed, backend, device, ranks)
    times["train"] = time.perf_counter() - started
    probes, gaps = _all_probes(view, quantizer, memory_budget, progress, ranks)
    times["assign"] = time.perf_counter() - started - times["train"]
    margin, recall, copy_recall, checked = _settled_margin(view, probes, gaps, quantizer, threshold, k, seed, ranks)
    times["check"] = time.perf_counter() - started - times["train"] - times["assign"]
    probes = within_margin(probes, gaps, margin)  # the probes the join reads; the rest is freed
    del gaps
    if getattr(view, "held", None) and len(view) * view.dim * view.itemsize <= memory_budget // HELD_SHARE:
        view = view.held()  # every group of lists reads its rows from memory, not from the mapped parts
    nprobe, mean_probes = probes.shape[1], float((probes >= 0).sum() / max(1, len(probes)))
    rows, cols, pairs = _joined(
        view, probes, nprobe, threshold, k, quantizer.nlist, memory_budget, spanning, progress, ranks
    )
    del probes
    times["join"] = time.perf_counter() - started - sum(times.values())
    if ranks.rank != 0:
        rows = cols = np.zeros(0, np.int64)
    seconds = {key: round(v, 3) for key, v in times.items()}
    two_level = quantizer.top is not None
    report = JoinReport(
        *(len(view), quantizer.nlist, two_level, margin, nprobe, round(mean_probes, 3)),
        *(round(recall, 6), round(copy_recall, 6), checked, pairs, seconds),
    )
    log.info(
        "list join of %d rows: %d lists%s, margin %.3f: %.2f probes a row, at most %d (recall %.4f of real, "
        "%.4f of threshold copies; %d checked), %d pairs >= %.3g; seconds %s%s",
        *(len(view), report.nlist, " (two levels)" if two_level else "", margin, mean_probes, nprobe, recall),
        *(copy_recall, checked, pairs, threshold, report.seconds),
        f"; rank {ranks.rank} of {ranks.world}" if ranks.world > 1 else "",
    )
    return rows, cols, report


def _settled_margin(view, probes, gaps, quantizer: Quantizer, threshold: float, k: int, seed: int, ranks):
    """(margin, recall, copy recall, checked edges): rank 0 settles the margin; every rank gets it."""
    from lvd.common.ranks import broadcast_array

    chosen = choose_margin(view, probes, gaps, quantizer, threshold, k, seed=seed) if ranks.rank == 0 else None
    settled = broadcast_array(np.array(chosen, np.float64) if chosen is not None else None, ranks).tolist()
    margin, recall, copy_recall, checked = settled
    return margin, recall, copy_recall, int(checked)


__all__ = [
    "Quantizer",
    "train_quantizer",
    "nearest_lists",
    "probe_lists",
    "exact_neighbors",
    "choose_margin",
    "within_margin",
    "linked",
    "join_lists",
    "EdgeForest",
    "list_count",
    "near_pairs",
    "JoinReport",
    "LIST_SIZE",
]
