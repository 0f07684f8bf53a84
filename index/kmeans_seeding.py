"""Initial centroids for k-means: greedy k-means++ (scikit-learn's form), on every row or a seeded sample.

Random rows as initial centroids put two seeds in one dense region and none in another, and
Lloyd's iterations rarely repair that (a centroid between two blobs is a fixed point): on 40k
vectors around 200 planted blobs, random seeding ends 7 % above scikit-learn's inertia at equal
iterations. k-means++ (Arthur & Vassilvitskii 2007) draws each next seed with probability
proportional to its squared distance to the nearest seed so far; the greedy form, scikit-learn's
default and ssl-data-curation's, draws 2 + ln k candidates per step and keeps the one that
leaves the smallest potential (sum of squared distances to the nearest seed).

Each of the k steps measures its candidates against every seeding row: about k (2 + ln k) n
distances, read from memory k times. While n x k is at most SEEDING_PAIRS the seeds come from
every row, as scikit-learn's do; past it, from a seeded sample of SEEDING_PAIRS / k rows (at
least 4 per cluster, at most MAX_SEEDING_ROWS), and Lloyd's iterations then run on every row.
Up to FULL_MATRIX_ROWS rows the seeding rows' pairwise distances are one matrix product
computed up front (256 MiB), far faster than k memory-bound passes. The sample depends only on
n, k and the seed, so every rank of a distributed run draws the same one (`index.kmeans`).
Above MAX_K clusters the k sequential steps cost more than they save: the seeds are random rows.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

# k-means++ looks at every row while rows x clusters is at most this, else at a seeded sample of
# this / k rows (k = 1000: 8000 rows, one full distance matrix).
SEEDING_PAIRS = 8_000_000
# Rows per cluster of the seeding sample, at the least.
MIN_ROWS_PER_CLUSTER = 4
# Rows k-means++ looks at, at most (few clusters: the sample is for every rank to hold).
MAX_SEEDING_ROWS = 65536
# Up to this many rows, all their squared distances are computed at once (float32, 256 MiB).
FULL_MATRIX_ROWS = 8192
# Above this many clusters the seeds are random rows.
MAX_K = 2048


def seeding_sample(n: int, k: int, seed: int) -> np.ndarray | None:
    """None when k-means++ looks at every one of n rows; else the sorted rows of its seeded sample."""
    rows = min(max(SEEDING_PAIRS // k, MIN_ROWS_PER_CLUSTER * k), MAX_SEEDING_ROWS)
    if n <= rows or (n * k <= SEEDING_PAIRS and n <= MAX_SEEDING_ROWS):
        return None
    return np.sort(np.random.default_rng([seed, 2007]).choice(n, rows, replace=False))


def random_rows(n: int, k: int, seed: int) -> np.ndarray:
    """k distinct rows drawn with `seed` (the seeding above MAX_K, and `init="random"`)."""
    return np.random.default_rng(seed).choice(n, k, replace=False)


def _squared_distances(x: np.ndarray):
    """A function rows -> squared distances of those rows to every row of x (float32)."""
    sq = np.einsum("ij,ij->i", x, x)
    if len(x) <= FULL_MATRIX_ROWS:
        xt = torch.from_numpy(x)
        # one product up front; each step then only gathers rows (k thin products would each
        # read all of x for a few candidates)
        full = torch.mm(xt, xt.T).mul_(-2).add_(torch.from_numpy(sq)[:, None]).add_(torch.from_numpy(sq)[None, :])
        full = full.clamp_(min=0).numpy()
        np.fill_diagonal(full, 0)
        return lambda rows: full[rows]

    def rows_to_all(rows):
        dots = (x @ x[rows].T).T  # the tall product reads x once, in its own layout
        out = sq[rows][:, None] - 2 * dots + sq[None, :]
        return np.maximum(out, 0, out=out)

    return rows_to_all


def kmeans_plusplus(x: np.ndarray, k: int, *, seed: int = 0, trials: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeds (k rows of x, float32): the first a random row, each next the best of
    `trials` (default 2 + ln k, as scikit-learn) candidates drawn with probability ∝ D²."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if not 0 < k <= n:
        raise ValueError(f"cannot draw {k} seeds from {n} rows")
    rng = np.random.default_rng(seed)
    trials = trials or 2 + int(np.log(k))
    distances = _squared_distances(x)
    chosen = [int(rng.integers(n))]
    d2 = distances([chosen[0]])[0].astype(np.float64)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # every row sits on a seed (duplicates): any row will do
            candidates = rng.integers(n, size=trials)
        else:
            candidates = np.searchsorted(np.cumsum(d2), rng.random(trials) * total).clip(max=n - 1)
        potentials = np.minimum(d2[None, :], distances(candidates))
        best = int(np.argmin(potentials.sum(1)))
        chosen.append(int(candidates[best]))
        d2 = potentials[best]
    return x[chosen].copy()


def seed_centroids(sample: np.ndarray, k: int, *, seed: int, spherical: bool = False) -> np.ndarray:
    """k-means++ seeds drawn from `sample` (the rows `seeding_sample` picked; unit rows when spherical)."""
    seeds = kmeans_plusplus(sample, k, seed=seed)
    if spherical:
        seeds /= np.maximum(np.linalg.norm(seeds, axis=1, keepdims=True), 1e-12)
    return seeds


__all__ = ["SEEDING_PAIRS", "MAX_K", "seeding_sample", "random_rows", "kmeans_plusplus", "seed_centroids"]
