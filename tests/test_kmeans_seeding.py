"""k-means++ seeding (scikit-learn's greedy form) against scikit-learn's KMeans, on every row or a sample."""

import numpy as np
import pytest
from sklearn.cluster import KMeans

import lvd.index.kmeans_seeding as seeding
from lvd.index.kmeans import kmeans


def grid_blobs(n=4000, side=(20, 10), spread=0.01, seed=0):
    """Tight blobs on a lattice of unit spacing: the optimum is one centroid per blob, and greedy
    k-means++ finds it (an unseeded blob holds ~12x the potential of all seeded ones together)."""
    rng = np.random.default_rng(seed)
    centres = np.stack(np.meshgrid(np.arange(side[0]), np.arange(side[1])), -1).reshape(-1, 2).astype(np.float64)
    labels = rng.integers(0, len(centres), n)
    return (centres[labels] + spread * rng.standard_normal((n, 2))).astype(np.float32), centres


def inertia(x, centroids):
    """Sum of squared distances to the nearest centroid, brute force in float64 (tight blobs far
    from the origin lose digits in the |x|^2 + |c|^2 - 2 x.c that fast searches compute)."""
    x64, c64 = x.astype(np.float64), np.asarray(centroids, np.float64)
    return float(((x64[:, None] - c64[None]) ** 2).sum(-1).min(1).sum())


@pytest.mark.slow
@pytest.mark.parametrize("sampled", [False, True])
def test_inertia_is_scikit_learns_at_equal_iterations(monkeypatch, sampled):
    x, centres = grid_blobs()
    k = len(centres)
    if sampled:  # k-means++ on a seeded sample of 2000 rows, Lloyd on all 4000
        monkeypatch.setattr(seeding, "SEEDING_PAIRS", k * 2000)
    sample = seeding.seeding_sample(len(x), k, 0)
    assert (sample is None) != sampled and (not sampled or len(sample) == 2000)
    random_worse = 0
    for seed in range(2):
        ours = kmeans(x, k, niter=20, seed=seed, backend="torch", dtype="fp32")
        ref = KMeans(k, n_init=1, max_iter=20, tol=0, random_state=seed, algorithm="lloyd").fit(x)
        best = inertia(x, ref.cluster_centers_)
        assert inertia(x, ours.centroids) <= 1.001 * best
        assert len(np.unique(ours.assign)) == k
        rows = kmeans(x, k, niter=20, seed=seed, backend="torch", dtype="fp32", init="random")
        random_worse += inertia(x, rows.centroids) > 1.5 * best
    assert random_worse == 2  # random rows as seeds miss blobs that Lloyd never recovers


@pytest.mark.parametrize("full_matrix_rows", [10_000, 10])
def test_one_seed_per_separated_blob(monkeypatch, full_matrix_rows):
    monkeypatch.setattr(seeding, "FULL_MATRIX_ROWS", full_matrix_rows)  # both ways of measuring distances
    rng = np.random.default_rng(6)
    centres = rng.normal(scale=20.0, size=(12, 8))
    labels = rng.integers(0, 12, size=1200)
    x = (centres[labels] + rng.normal(scale=0.3, size=(1200, 8))).astype(np.float32)
    seeds = seeding.kmeans_plusplus(x, 12, seed=0)
    nearest_centre = ((seeds[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    assert sorted(nearest_centre) == list(range(12))
    assert all((np.abs(x - s).sum(1) < 1e-6).any() for s in seeds)  # seeds are rows of x


def test_both_ways_of_measuring_distances_draw_the_same_seeds(monkeypatch):
    x, _ = grid_blobs(n=600, side=(6, 5), spread=0.3, seed=3)
    full = seeding.kmeans_plusplus(x, 30, seed=4)
    monkeypatch.setattr(seeding, "FULL_MATRIX_ROWS", 10)
    np.testing.assert_array_equal(seeding.kmeans_plusplus(x, 30, seed=4), full)


def test_the_seeding_sample_is_taken_once_rows_times_clusters_is_large():
    assert seeding.seeding_sample(40_000, 200, seed=0) is None  # 8M pairs: every row, as scikit-learn
    sample = seeding.seeding_sample(100_000, 1000, seed=0)
    assert len(sample) == seeding.SEEDING_PAIRS // 1000 and np.all(np.diff(sample) > 0)
    np.testing.assert_array_equal(sample, seeding.seeding_sample(100_000, 1000, seed=0))
    assert not np.array_equal(sample, seeding.seeding_sample(100_000, 1000, seed=1))
    assert len(seeding.seeding_sample(10**9, 2000, seed=0)) == 4 * 2000  # at least 4 rows per cluster
    assert len(seeding.seeding_sample(10**9, 2, seed=0)) == seeding.MAX_SEEDING_ROWS


def test_duplicate_rows_and_spherical_seeds():
    x = np.repeat(np.eye(3, dtype=np.float32), 5, axis=0)  # three distinct rows, five times each
    seeds = seeding.kmeans_plusplus(x, 5, seed=0)
    assert len({tuple(s) for s in seeds[:3]}) == 3  # the distinct rows first, then any row
    unit = seeding.seed_centroids(2 * x, 3, seed=0, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-6)
