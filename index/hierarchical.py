"""Hierarchical k-means with resampling, and balanced hierarchical sampling.

Re-implemented from Vo et al. 2024, "Automatic data curation for self-supervised learning: a
clustering-based approach". Plain k-means on web-scale data spends its centroids where the
data is dense (many centroids on a few over-represented concepts). The paper's remedies:

* levels: level 1 clusters the points; level t clusters the centroids of level t-1, each
  centroid counting once whatever its cluster's size, so every level is flatter than the last;
* resampling: after k-means, take the `sample_size` points closest to each centroid (at most
  that many per cluster, so the union is balanced across clusters), run k-means afresh on that
  union, and re-assign every point; repeated `resampling_steps` times, this pulls centroids
  out of dense regions (a fresh start matters: the current centroids are a fixed point of
  Lloyd's iterations on their own resampled points). The paper takes about half the level's
  mean cluster size, and resamples no level whose half is a single point (`resample_size`);
* balanced sampling: to draw n points, give every top-level cluster an equal share (a cluster
  smaller than its share gives all it has, the rest going to the others), split each cluster's
  share equally among its children the same way, down to the points of level 1.

Arrays in, arrays out; levels are numbered from 1 (finest) to T (coarsest).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lvd.index.backend_choice import choose_backend
from lvd.index.kmeans import kmeans

logger = logging.getLogger(__name__)

# Lloyd iterations per level in the paper (and ssl-data-curation's configs): 50.
PAPER_NITER = 50


@dataclass
class Hierarchy:
    """Result of `hierarchical_kmeans`.

    `centroids[t-1]` are the k_t centroids of level t. `parents[0]` is the level-1 cluster of
    every point; `parents[t-1]` (t > 1) is the level-t cluster of every level-(t-1) centroid.
    `distances[t-1]` is the squared L2 distance of each level-t input to its centroid.
    """

    centroids: list[np.ndarray]
    parents: list[np.ndarray]
    distances: list[np.ndarray]
    params: dict = field(default_factory=dict)

    @property
    def n_levels(self) -> int:
        return len(self.centroids)

    def labels(self, level: int) -> np.ndarray:
        """Level-`level` cluster of every point (assignments composed through the levels)."""
        if not 1 <= level <= self.n_levels:
            raise ValueError(f"level must be in 1..{self.n_levels}, got {level}")
        labels = self.parents[0]
        for t in range(1, level):
            labels = self.parents[t][labels]
        return labels

    def sizes(self, level: int) -> np.ndarray:
        """Number of points under each level-`level` cluster."""
        return np.bincount(self.labels(level), minlength=len(self.centroids[level - 1]))


def _per_level(value, n_levels: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n_levels
    if len(values) != n_levels:
        raise ValueError(f"{name} has {len(values)} entries for {n_levels} levels")
    return values


def nearest_centroids(
    x, centroids: np.ndarray, backend: str, device: str, block_rows: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (squared L2) of every row of x: (assign, distance). x is an array or an
    `index.io.EmbeddingRows` view, read `block_rows` at a time, so only one block is held as float32."""
    n = len(x)
    assign, distance = np.empty(n, np.int64), np.empty(n, np.float32)
    if n == 0:
        return assign, distance
    first = np.asarray(x[slice(0, min(n, block_rows))], np.float32)
    engine = choose_backend("nearest centroid", centroids, first, 1, metric="l2", backend=backend, device=device)
    for start in range(0, n, block_rows):
        block = first if start == 0 else np.asarray(x[slice(start, start + block_rows)], np.float32)
        d2, nearest = engine.assign(block, centroids)
        assign[start : start + len(block)] = nearest
        distance[start : start + len(block)] = d2
    return assign, distance


def rank_within_groups(groups: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Rank of each row among the rows of its group, ordered by `keys` (ties: row index)."""
    n = len(groups)
    order = np.lexsort((np.arange(n), keys, groups))
    sorted_groups = groups[order]
    starts = np.ones(n, bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    start_of = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - start_of
    return rank


def closest_per_cluster(assign: np.ndarray, distance: np.ndarray, r: int) -> np.ndarray:
    """Indices of the (up to) r rows closest to their centroid in every cluster, sorted."""
    return np.flatnonzero(rank_within_groups(assign, distance) < r)


def resample_size(n: int, k: int, sample_size: int | None = None) -> int:
    """Points kept per cluster at each resampling step: `sample_size`, or about half the mean
    cluster size n / k (the paper's choice, `ssl-data-curation`'s configs). Below 2 there is
    nothing to resample: k-means of one point per cluster returns those points."""
    return int(sample_size) if sample_size else (n // k) // 2


def resampled_kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    resampling_steps: int = 0,
    sample_size: int | None = None,
    seed: int = 0,
    spherical: bool = False,
    backend: str = "auto",
    device: str = "cpu",
    checkpoint: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means followed by resampling steps; returns (centroids, assign, squared distance).

    Each step keeps the `sample_size` points nearest to each centroid, runs k-means on them
    from a fresh initialisation, and re-assigns all points. `sample_size` defaults to half the
    mean cluster size (`resample_size`). With `resampling_steps=0` this is flat k-means seeded by
    k-means++;
    `checkpoint` (a file) lets a killed run of that first k-means resume (`index.kmeans`).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if k > len(x):
        raise ValueError(f"cannot make {k} clusters of {len(x)} points")
    result = kmeans(
        x, k, niter=niter, seed=seed, spherical=spherical, backend=backend, device=device, checkpoint=checkpoint
    )
    centroids, assign, distance = result.centroids, result.assign, result.distance
    r = resample_size(len(x), k, sample_size)
    for step in range(resampling_steps if r >= 2 else 0):
        picked = closest_per_cluster(assign, distance, r)
        if len(picked) < k:
            break  # fewer resampled points than clusters: nothing left to balance
        result = kmeans(
            x[picked], k, niter=niter, seed=seed + step + 1, spherical=spherical, backend=backend, device=device
        )
        centroids = result.centroids
        assign, distance = nearest_centroids(x, centroids, backend, device)
        logger.debug("resampling step %d: %d points, inertia %.4g", step + 1, len(picked), float(distance.sum()))
    return np.asarray(centroids, np.float32), np.asarray(assign, np.int64), np.asarray(distance, np.float32)


def hierarchical_kmeans(
    x: np.ndarray,
    ks: Sequence[int],
    *,
    niter: int = 20,
    resampling_steps: int | Sequence[int] = 0,
    sample_size: int | None | Sequence[int | None] = None,
    seed: int = 0,
    spherical: bool = False,
    backend: str = "auto",
    device: str = "cpu",
    done: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] = (),
    on_level: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
    first_level: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
) -> Hierarchy:
    """Levels of (resampled) k-means, level 1 on `x` with ks[0] clusters, level t on level t-1's centroids.

    `done` holds the (centroids, assign, distance) of levels finished by an earlier, killed
    run; they are reused, not recomputed. `on_level(level, centroids, assign, distance)` is
    called after each computed level so that a caller can save it. Level t uses the seed
    `seed + 1000 * (t - 1)`, so a resumed run equals an uninterrupted one. `first_level`, when
    given, computes level 1 instead of `resampled_kmeans`, with the same arguments but x
    (`first_level(k, resampling_steps=, sample_size=, seed=)`): the cluster stage spreads that
    level, the one over every image, across torchrun ranks; then x need not be an array.
    """
    ks = [int(k) for k in ks]
    if not ks or any(b > a for a, b in zip(ks, ks[1:])):
        raise ValueError(f"ks must be a non-empty, non-increasing list of cluster counts, got {ks}")
    steps = _per_level(resampling_steps, len(ks), "resampling_steps")
    sizes = _per_level(sample_size, len(ks), "sample_size")
    inputs = x
    centroids, parents, distances = [], [], []
    for t, k in enumerate(ks):
        if t < len(done):
            c, a, d = done[t]
            if len(c) != k or len(a) != len(inputs):
                raise ValueError(f"saved level {t + 1} does not fit: {len(c)} centroids for {len(a)} inputs")
        else:
            logger.info("hierarchical k-means level %d: %d inputs -> %d clusters", t + 1, len(inputs), k)
            if t == 0 and first_level is not None:
                c, a, d = first_level(k, resampling_steps=steps[t], sample_size=sizes[t], seed=seed)
            else:
                c, a, d = resampled_kmeans(
                    np.asarray(inputs, dtype=np.float32),
                    k,
                    niter=niter,
                    resampling_steps=steps[t],
                    sample_size=sizes[t],
                    seed=seed + 1000 * t,
                    spherical=spherical,
                    backend=backend,
                    device=device,
                )
            if on_level is not None:
                on_level(t + 1, c, a, d)
        centroids.append(c)
        parents.append(a)
        distances.append(d)
        inputs = np.ascontiguousarray(c, dtype=np.float32)
    params = dict(ks=ks, niter=niter, resampling_steps=steps, sample_size=sizes, seed=seed, spherical=spherical)
    return Hierarchy(centroids, parents, distances, params)


def balanced_quota(total: int, sizes: np.ndarray) -> np.ndarray:
    """Split `total` as equally as possible among groups holding `sizes` items (water-filling).

    Groups smaller than their share give all they have; what they cannot give is shared among
    the others. Shares differ by at most one; extra units go to the larger groups (then the
    later ones), so the split is deterministic.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    quota = np.zeros(len(sizes), np.int64)
    remaining = min(int(total), int(sizes.sum()))
    order = np.argsort(sizes, kind="stable")
    for i, g in enumerate(order):
        share = remaining // (len(order) - i)
        quota[g] = min(int(sizes[g]), share)
        remaining -= quota[g]
    return quota


def balanced_sample(
    hierarchy: Hierarchy,
    n: int,
    *,
    strategy: str = "random",
    seed: int = 0,
) -> np.ndarray:
    """Indices (sorted) of n points drawn with equal shares per cluster at every level.

    strategy: "random" draws a cluster's share uniformly among its points; "closest" takes
    the points nearest to their level-1 centroid.
    """
    if strategy not in ("random", "closest"):
        raise ValueError(f"strategy must be 'random' or 'closest', got {strategy!r}")
    top = hierarchy.n_levels
    quota = balanced_quota(n, hierarchy.sizes(top))
    for level in range(top - 1, 0, -1):
        parent_of = hierarchy.parents[level]  # level-(level+1) cluster of each level-`level` cluster
        child_sizes = hierarchy.sizes(level)
        child_quota = np.zeros(len(child_sizes), np.int64)
        by_parent = np.argsort(parent_of, kind="stable")
        bounds = np.searchsorted(parent_of[by_parent], np.arange(len(quota) + 1))
        for p in np.flatnonzero(quota):
            children = by_parent[bounds[p] : bounds[p + 1]]
            child_quota[children] = balanced_quota(quota[p], child_sizes[children])
        quota = child_quota
    labels = hierarchy.parents[0]
    if strategy == "random":
        keys = np.random.default_rng(seed).random(len(labels))
    else:
        keys = hierarchy.distances[0]
    return np.flatnonzero(rank_within_groups(labels, keys) < quota[labels])
