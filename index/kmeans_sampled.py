"""k-means within a memory budget: train on a seeded sample, then assign every row block by block.

Past a share of the budget the rows cannot all be held as float32, so k-means trains on a
seeded sample of at most TRAIN_POINTS_PER_CENTROID rows per cluster (Faiss's own
`max_points_per_centroid`, past which centroids move little while the cost grows with every row)
and every row is then assigned to its nearest centroid, reading the rows in blocks. Arrays (or an
`index.io.EmbeddingRows` view) in, arrays out; under torchrun each rank works on its slice.
"""

from __future__ import annotations

import numpy as np

from lvd.common.errors import UserError
from lvd.common.ranks import Ranks, gather_rows, rank_slice
from lvd.index.hierarchical import nearest_centroids, resampled_kmeans
from lvd.index.kmeans_distributed import distributed_resampled_kmeans

# The whole matrix is clustered in memory (float32) while it takes at most this share of the budget.
FULL_MATRIX_SHARE = 0.25
# Rows per centroid of the training sample.
TRAIN_POINTS_PER_CENTROID = 256
# Rows per block when measuring row-to-centroid distances.
DISTANCE_BLOCK = 65536


class BudgetTooSmallError(UserError, MemoryError):
    """memory_gb cannot hold even one training row per cluster."""


def training_rows(n: int, dim: int, k: int, budget: int, seed: int) -> np.ndarray | None:
    """None when the n rows fit FULL_MATRIX_SHARE of the budget as float32 (k-means uses every
    row); else the sorted rows of a seeded sample that k-means trains on, at most
    TRAIN_POINTS_PER_CENTROID per cluster and within that share."""
    if n * dim * 4 <= FULL_MATRIX_SHARE * budget:
        return None
    fits = int(FULL_MATRIX_SHARE * budget // (dim * 4))
    m = min(n, fits, TRAIN_POINTS_PER_CENTROID * k)
    if m < k:
        raise BudgetTooSmallError(
            f"k-means of {k} clusters needs at least {k} training rows in memory, but "
            f"{FULL_MATRIX_SHARE:.0%} of memory_gb holds only {fits}; raise memory_gb"
        )
    return np.sort(np.random.default_rng([seed, 11]).choice(n, m, replace=False))


def sampled_kmeans(
    view, train: np.ndarray, k: int, *, ranks: Ranks | None = None, block_rows: int = DISTANCE_BLOCK, **kwargs
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroids, assign, squared distance): `resampled_kmeans` on the training rows of `view`,
    then every row assigned to its nearest centroid `block_rows` at a time. Under torchrun each
    rank iterates over its slice of the sample and assigns its slice of the rows."""
    backend, device = kwargs["backend"], kwargs["device"]
    if ranks is None or ranks.world == 1:
        centroids, _, _ = resampled_kmeans(view[train], k, **kwargs)
        assign, distance = nearest_centroids(view, centroids, backend, device, block_rows)
        return centroids, assign, distance
    centroids, _, _ = distributed_resampled_kmeans(view.subset(train), k, ranks=ranks, **kwargs)
    assign, distance = nearest_centroids(
        view.subset(rank_slice(len(view), ranks)), centroids, backend, device, block_rows
    )
    return centroids, gather_rows(assign, ranks), gather_rows(distance, ranks)


def squared_distances(x, centroids: np.ndarray, labels: np.ndarray, block_rows: int = DISTANCE_BLOCK) -> np.ndarray:
    """Squared L2 distance of each row of x (an array or a view) to its labelled centroid, in bounded blocks."""
    out = np.empty(len(x), np.float32)
    for start in range(0, len(x), block_rows):
        block = np.asarray(x[slice(start, start + block_rows)], np.float32)
        diff = block - centroids[labels[start : start + block_rows]]
        out[start : start + block_rows] = np.einsum("ij,ij->i", diff, diff)
    return out
