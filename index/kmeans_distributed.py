"""k-means over torchrun ranks: each rank iterates over its slice, centroid sums are all-reduced.

Arrays (or `index.io.EmbeddingRows` views) and a `lvd.common.ranks.Ranks` in, the
single-process result out on every rank: `index.kmeans` draws the same k-means++ seeds from the
same sampled rows on every rank, so 2 gloo ranks equal 1 process (tested in
tests/test_kmeans_distributed.py and the cluster stage).
"""

from __future__ import annotations

import numpy as np

from lvd.common.ranks import Ranks, gather_rows, rank_slice
from lvd.index.hierarchical import closest_per_cluster, nearest_centroids, resample_size
from lvd.index.kmeans import kmeans


def distributed_kmeans(
    x, k: int, ranks: Ranks, *, niter: int, seed: int, spherical: bool, backend: str, device: str, checkpoint
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat k-means of x over the torchrun ranks, each iterating over its `rank_slice` of the rows.

    x is an array or an `index.io.EmbeddingRows` view, from which a rank reads only its slice.
    The k-means++ seeds come from the seeding sample, whose rows each rank contributes from its
    slice, so the result is the single-process one: (centroids, assign, squared distance) of all
    rows, on every rank.
    """
    result = kmeans(
        x[rank_slice(len(x), ranks)],
        k,
        niter=niter,
        seed=seed,
        spherical=spherical,
        backend=backend,
        device=device,
        distributed=True,
        checkpoint=checkpoint,
    )
    return (
        np.asarray(result.centroids, np.float32),
        gather_rows(np.asarray(result.assign, np.int64), ranks),
        gather_rows(np.asarray(result.distance, np.float32), ranks),
    )


def distributed_resampled_kmeans(
    x,
    k: int,
    *,
    ranks: Ranks,
    resampling_steps: int = 0,
    sample_size: int | None = None,
    niter: int,
    seed: int,
    spherical: bool,
    backend: str,
    device: str,
    checkpoint=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`index.hierarchical.resampled_kmeans` over the torchrun ranks (same steps, same seeds).

    The resampled points are chosen from the gathered assignments, identically on every rank,
    and clustered as a view (`EmbeddingRows.subset`); each rank re-assigns its own slice.
    """
    centroids, assign, distance = distributed_kmeans(
        x, k, ranks, niter=niter, seed=seed, spherical=spherical, backend=backend, device=device, checkpoint=checkpoint
    )
    size = resample_size(len(x), k, sample_size)
    for step in range(resampling_steps if size >= 2 else 0):
        picked = closest_per_cluster(assign, distance, size)
        if len(picked) < k:
            break  # fewer resampled points than clusters: nothing left to balance
        subset = x.subset(picked) if hasattr(x, "subset") else x[picked]
        centroids, _, _ = distributed_kmeans(
            subset,
            k,
            ranks,
            niter=niter,
            seed=seed + step + 1,
            spherical=spherical,
            backend=backend,
            device=device,
            checkpoint=None,
        )
        local_assign, local_distance = nearest_centroids(x[rank_slice(len(x), ranks)], centroids, backend, device)
        assign, distance = gather_rows(local_assign, ranks), gather_rows(local_distance, ranks)
    return centroids, assign, distance
