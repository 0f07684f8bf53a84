"""Hierarchical k-means with resampling and balanced sampling (Vo et al. 2024)."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from lvd.index.hierarchical import (
    Hierarchy,
    balanced_quota,
    balanced_sample,
    closest_per_cluster,
    hierarchical_kmeans,
    resampled_kmeans,
)


def planted_hierarchy(seed=0, n_super=4, n_sub=5, dim=16):
    """Points around sub-centres, sub-centres around super-centres; very unequal sub-blob sizes."""
    rng = np.random.default_rng(seed)
    supers = rng.normal(scale=10.0, size=(n_super, dim))
    xs, sub_labels, super_labels = [], [], []
    for s in range(n_super):
        for j in range(n_sub):
            centre = supers[s] + rng.normal(scale=1.5, size=dim)
            size = int(rng.integers(20, 400))
            xs.append(centre + rng.normal(scale=0.15, size=(size, dim)))
            sub_labels += [s * n_sub + j] * size
            super_labels += [s] * size
    order = rng.permutation(sum(len(b) for b in xs))
    x = np.concatenate(xs).astype(np.float32)[order]
    return x, np.array(sub_labels)[order], np.array(super_labels)[order]


def test_recovers_planted_hierarchical_blobs():
    x, sub, sup = planted_hierarchy()
    h = hierarchical_kmeans(x, [20, 4], niter=25, resampling_steps=[3, 1], seed=0)
    assert h.n_levels == 2 and h.centroids[0].shape == (20, 16) and h.centroids[1].shape == (4, 16)
    assert adjusted_rand_score(sup, h.labels(2)) == pytest.approx(1.0)
    assert adjusted_rand_score(sub, h.labels(1)) > 0.9
    # the composition is consistent: all points of a level-1 cluster share one level-2 cluster
    for c in range(20):
        assert len(np.unique(h.labels(2)[h.labels(1) == c])) <= 1
    # the stored distances are squared L2 to the assigned centroid (brute force)
    ref = ((x - h.centroids[0][h.labels(1)]) ** 2).sum(1)
    np.testing.assert_allclose(h.distances[0], ref, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_resampling_moves_centroids_out_of_dense_regions():
    rng = np.random.default_rng(1)
    dense = rng.normal(scale=1.0, size=(20000, 2))
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    small = [np.c_[np.cos(a), np.sin(a)] * 12 + rng.normal(scale=0.3, size=(40, 2)) for a in angles]
    x = np.concatenate([dense] + small).astype(np.float32)
    k = 16

    def in_dense(centroids):
        return int((np.linalg.norm(centroids, axis=1) < 4).sum())

    for seed in range(2):
        plain, _, _ = resampled_kmeans(x, k, niter=30, resampling_steps=0, seed=seed)
        resampled, _, _ = resampled_kmeans(x, k, niter=30, resampling_steps=5, sample_size=40, seed=seed)
        # 12 small blobs and 16 centroids: 4 would cover the dense blob, but k-means' objective
        # (its 20000 points against 40 per small blob) puts about 8 there
        assert in_dense(plain) >= 6
        assert in_dense(resampled) < in_dense(plain)


def test_closest_per_cluster_brute_force():
    rng = np.random.default_rng(2)
    assign = rng.integers(0, 7, size=500)
    distance = rng.random(500).astype(np.float32)
    got = closest_per_cluster(assign, distance, 10)
    expected = np.sort(
        np.concatenate([np.flatnonzero(assign == c)[np.argsort(distance[assign == c])[:10]] for c in range(7)])
    )
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("total", [0, 7, 100, 333, 1000, 5000])
def test_balanced_quota_is_water_filling(total):
    sizes = np.random.default_rng(total).integers(0, 120, size=23)
    quota = balanced_quota(total, sizes)
    assert quota.sum() == min(total, sizes.sum())
    assert (quota <= sizes).all() and (quota >= 0).all()
    # reference: the largest level L with sum(min(s, L)) <= total; everyone gets min(s, L),
    # and groups larger than L get at most one more
    level = max(L for L in range(0, sizes.max() + 1) if np.minimum(sizes, L).sum() <= total)
    base = np.minimum(sizes, level)
    extra = quota - base
    assert set(np.unique(extra)) <= {0, 1}
    assert (extra[sizes <= level] == 0).all()


def test_balanced_sample_equal_shares_at_every_level():
    # 3 top clusters; children (level-1 clusters) of very different sizes
    child_sizes = np.array([500, 3, 40, 200, 10, 10, 5, 800, 60])
    child_parent = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    labels = np.repeat(np.arange(len(child_sizes)), child_sizes)
    rng = np.random.default_rng(3)
    perm = rng.permutation(len(labels))
    labels = labels[perm]
    h = Hierarchy(
        centroids=[np.zeros((9, 2), np.float32), np.zeros((3, 2), np.float32)],
        parents=[labels, child_parent],
        distances=[rng.random(len(labels)).astype(np.float32), np.zeros(9, np.float32)],
    )
    picked = balanced_sample(h, 150, seed=0)
    assert len(picked) == 150 and len(np.unique(picked)) == 150
    per_child = np.bincount(labels[picked], minlength=9)
    per_top = np.bincount(child_parent[np.arange(9)].repeat(per_child), minlength=3)
    np.testing.assert_array_equal(per_top, [50, 50, 50])
    # inside each top cluster: small children give all, the rest share equally (within one)
    np.testing.assert_array_equal(per_child[[1, 4, 5, 6]], [3, 10, 10, 5])
    assert abs(per_child[0] - per_child[2]) <= 1 and abs(per_child[7] - per_child[8]) <= 1
    assert per_child[3] == 30
    # "closest" takes the nearest points of each level-1 cluster
    closest = balanced_sample(h, 150, strategy="closest")
    for c in range(9):
        members = np.flatnonzero(labels == c)
        chosen = np.intersect1d(closest, members)
        assert len(chosen) == per_child[c]
        if 0 < len(chosen) < len(members):
            rest = np.setdiff1d(members, chosen)
            assert h.distances[0][chosen].max() <= h.distances[0][rest].min()


def test_balanced_sample_from_kmeans_evens_out_planted_groups():
    x, _, sup = planted_hierarchy(seed=4)
    h = hierarchical_kmeans(x, [20, 4], niter=25, resampling_steps=[2, 0], seed=1)
    picked = balanced_sample(h, 200, seed=5)
    counts = np.bincount(sup[picked], minlength=4)
    assert counts.sum() == 200 and counts.max() - counts.min() <= 1
    # the planted groups themselves are unequal, so a uniform draw would not be balanced
    sizes = np.bincount(sup)
    assert sizes.max() > 1.3 * sizes.min()


def test_hierarchical_kmeans_rejects_growing_levels():
    with pytest.raises(ValueError):
        hierarchical_kmeans(np.zeros((10, 2), np.float32), [2, 5])
