"""Exact top-k over a pool read block by block, and merging best lists (per block, per rank).

A pool too large to hold is searched a block at a time, keeping each query's running best k;
`best_columns` merges candidate lists so that any split of the pool (blocks, or the slices of
torchrun ranks) gives what one pass over all of it gives, ties going to the lower row. Arrays
in, arrays out; the pool may be an `index.io.EmbeddingRows` view.
"""

from __future__ import annotations

import numpy as np

from lvd.common.ranks import Ranks, gather_rows


def best_columns(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (similarity, row) of each line of candidates, best first, ties to the lower
    row; empty slots (-inf, or row -1) come last as (-inf, -1). Merging per-block or per-rank
    best lists with it gives what one pass over all the rows gives."""
    sims = np.asarray(sims, np.float32)
    empty = ~np.isfinite(sims) | (idx < 0)
    sims = np.where(empty, -np.inf, sims).astype(np.float32)
    idx = np.where(empty, np.iinfo(np.int64).max, idx)
    order = np.lexsort((idx, -sims), axis=1)[:, :k]
    best_s, best_i = np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)
    return best_s, np.where(np.isfinite(best_s), best_i, -1)


def top_neighbors(pool_x, seed_x, k: int, *, backend="auto", device="cpu", block_rows: int = 262144, offset: int = 0):
    """(similarity, pool row) [q, k] of the k most similar pool rows of every query, best first
    (ties: lower row), reading `pool_x` (an array or an `index.io.EmbeddingRows` view)
    `block_rows` at a time and keeping the running best, so the pool is never held whole.
    `offset` is added to the rows (a rank's slice of a larger pool)."""
    from lvd.index.knn import search

    n, q = len(pool_x), len(seed_x)
    k = min(k, n)
    best_s = np.full((q, 0), -np.inf, np.float32)
    best_i = np.zeros((q, 0), np.int64)
    for start in range(0, n, block_rows):
        block = np.asarray(pool_x[slice(start, start + block_rows)], np.float32)
        kb = min(k, len(block))
        sims, idx = search(block, seed_x, kb, metric="ip", method="exact", backend=backend, device=device)
        idx = np.where(idx >= 0, idx + start + offset, -1)
        best_s, best_i = best_columns(np.concatenate([best_s, sims], 1), np.concatenate([best_i, idx], 1), k)
    return best_s, best_i


def gather_neighbors(
    sims: np.ndarray, idx: np.ndarray, k: int, ranks: Ranks, *, memory_budget: int = 1 << 30
) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's `top_neighbors` of its slice of the pool merged into the k best over the
    whole pool, on every rank. Each rank sends q * k pairs, not its rows, a run of queries at a
    time so that the world's candidates for one run take an eighth of `memory_budget`."""
    if ranks.world == 1:
        return sims, idx
    q, have = sims.shape
    pad = k - have  # a slice shorter than k gives fewer columns
    sims = np.pad(np.asarray(sims, np.float32), ((0, 0), (0, pad)), constant_values=-np.inf)
    idx = np.pad(np.asarray(idx, np.int64), ((0, 0), (0, pad)), constant_values=-1)
    run = max(1, memory_budget // (8 * ranks.world * max(1, k) * 12))
    for start in range(0, q, run):
        part = slice(start, min(q, start + run))
        width = part.stop - part.start
        all_s = gather_rows(sims[part], ranks).reshape(ranks.world, width, k).transpose(1, 0, 2)
        all_i = gather_rows(idx[part], ranks).reshape(ranks.world, width, k).transpose(1, 0, 2)
        sims[part], idx[part] = best_columns(all_s.reshape(width, -1), all_i.reshape(width, -1), k)
    return sims, idx
