"""k-means within a memory budget (`index.kmeans_sampled`): the training sample, and every row
assigned in blocks, against brute-force numpy."""

import numpy as np
import pytest

from lvd.index import kmeans_sampled


def test_training_rows_sample_only_past_the_budget():
    assert kmeans_sampled.training_rows(1000, 64, 10, budget=1 << 30, seed=0) is None  # 256 kB of 1 GiB: every row
    budget = 4 * 64 * 400 * 4  # a quarter of it holds 400 float32 rows of d = 64
    rows = kmeans_sampled.training_rows(1000, 64, 10, budget=budget, seed=0)
    assert len(rows) == 400 and len(np.unique(rows)) == 400 and np.all(np.diff(rows) > 0) and rows.max() < 1000
    assert (
        len(kmeans_sampled.training_rows(10**6, 64, 1, budget=budget, seed=0))
        == kmeans_sampled.TRAIN_POINTS_PER_CENTROID
    )
    with pytest.raises(MemoryError, match="memory_gb"):
        kmeans_sampled.training_rows(1000, 64, 500, budget=budget, seed=0)


def test_squared_distances_in_blocks_equal_the_whole_matrix():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(257, 9)).astype(np.float32)
    centroids = rng.normal(size=(5, 9)).astype(np.float32)
    labels = rng.integers(0, 5, len(x))
    expected = ((x - centroids[labels]) ** 2).sum(1)
    for block in (1, 16, 1000):
        np.testing.assert_allclose(kmeans_sampled.squared_distances(x, centroids, labels, block), expected, rtol=1e-5)


def test_sampled_kmeans_assigns_every_row_to_its_nearest_centroid():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(4, 6)).astype(np.float32) * 6
    x = (centres[rng.integers(0, 4, 900)] + rng.normal(size=(900, 6))).astype(np.float32)
    train = kmeans_sampled.training_rows(len(x), 6, 4, budget=4 * 6 * 4 * 200, seed=0)
    assert train is not None and len(train) == 200
    centroids, assign, distance = kmeans_sampled.sampled_kmeans(
        x, train, 4, niter=10, seed=0, spherical=False, backend="faiss", device="cpu", block_rows=64
    )
    d2 = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(assign, d2.argmin(1))
    np.testing.assert_allclose(distance, d2.min(1), rtol=1e-4, atol=1e-4)
