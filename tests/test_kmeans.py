"""Flat k-means against scikit-learn and a numpy Lloyd; checkpoints and resumption."""

import numpy as np
import pytest
from sklearn.cluster import KMeans

from lvd.index.backends import TorchBackend
from lvd.index.kmeans import kmeans


def blobs(n, d, centres, seed, spread=1.0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)) * 4
    return (c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, d))).astype(np.float32)


def numpy_lloyd(x, init, niter, spherical):
    """Textbook Lloyd in float64, the reference for the spherical variant."""
    c = init.astype(np.float64)
    x64 = x.astype(np.float64)
    for _ in range(niter):
        a = ((x64[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x64[a == j].mean(0) for j in range(len(c))])
        if spherical:
            c /= np.linalg.norm(c, axis=1, keepdims=True)
    d2 = ((x64[:, None] - c[None]) ** 2).sum(-1)
    return c, d2.argmin(1), d2.min(1).sum()


@pytest.mark.parametrize("backend,dtype", [("faiss", "auto"), ("torch", "fp32"), ("torch", "bf16")])
def test_inertia_matches_scikit_learn_with_same_init(backend, dtype):
    x = blobs(3000, 12, 15, seed=0, spread=2.0)
    init = x[np.random.default_rng(1).choice(len(x), 15, replace=False)]
    ours = kmeans(x, 15, niter=10, backend=backend, dtype=dtype, init=init)
    ref = KMeans(15, init=init, n_init=1, max_iter=10, tol=0, algorithm="lloyd").fit(x)
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-4)
    np.testing.assert_allclose(np.sort(ours.centroids, 0), np.sort(ref.cluster_centers_, 0), atol=1e-3)
    assert (ours.assign == ref.labels_).mean() > 0.999
    np.testing.assert_allclose(ours.distance.sum(), ours.inertia, rtol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_spherical_matches_numpy(backend):
    x = blobs(1500, 8, 6, seed=2)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    init = x[:6].copy()
    ours = kmeans(x, 6, niter=8, spherical=True, backend=backend, init=init)
    c, a, inertia = numpy_lloyd(x, init, 8, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(ours.centroids, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(ours.centroids, c, atol=1e-4)
    assert ours.inertia == pytest.approx(inertia, rel=1e-5)


def test_faiss_uses_every_row():
    """Faiss would sub-sample to 256 rows per centroid; with 1500 per centroid it must not."""
    x = blobs(3000, 4, 2, seed=3, spread=3.0)
    init = x[:2].copy()
    ours = kmeans(x, 2, niter=6, backend="faiss", init=init)
    c, _, inertia = numpy_lloyd(x, init, 6, spherical=False)
    np.testing.assert_allclose(np.sort(ours.centroids, 0), np.sort(c, 0), atol=1e-4)
    assert ours.inertia == pytest.approx(inertia, rel=1e-6)


def test_default_init_is_shared_by_backends():
    x = blobs(800, 6, 5, seed=4)
    a = kmeans(x, 5, niter=5, seed=7, backend="faiss")
    b = kmeans(x, 5, niter=5, seed=7, backend="torch")
    np.testing.assert_allclose(a.centroids, b.centroids, atol=1e-4)
    np.testing.assert_array_equal(a.assign, b.assign)


def test_empty_cluster_takes_the_farthest_row():
    x = blobs(400, 3, 4, seed=5)
    init = np.stack([x[0], x[0], x[1], x[2]])  # two identical centroids: one gets no rows
    out = kmeans(x, 4, niter=1, backend="torch", init=init)
    d2 = ((x[:, None].astype(np.float64) - init[None]) ** 2).sum(-1)
    farthest = x[d2.min(1).argmax()]
    assert any(np.allclose(c, farthest) for c in out.centroids)
    assert len(np.unique(kmeans(x, 4, niter=5, backend="torch", init=init).assign)) == 4


class Killed(RuntimeError):
    pass


class DiesAfter(TorchBackend):
    """A backend that fails on its n-th search, like a killed job."""

    def __init__(self, calls):
        super().__init__("cpu", "fp32")
        self.calls = calls

    def search(self, *args, **kwargs):
        self.calls -= 1
        if self.calls < 0:
            raise Killed
        return super().search(*args, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_killed_run_resumes_to_the_same_result(tmp_path, backend):
    x = blobs(2000, 8, 12, seed=6, spread=2.5)
    full = kmeans(x, 12, niter=10, backend=backend, seed=1)
    path = tmp_path / "ckpt.npz"
    if backend == "torch":
        with pytest.raises(Killed):
            kmeans(x, 12, niter=10, backend=DiesAfter(9), seed=1, checkpoint=path, checkpoint_every=3)
        assert int(np.load(path)["iteration"]) in (3, 6)
    else:
        kmeans(x, 12, niter=6, backend=backend, seed=1, checkpoint=path, checkpoint_every=3)
    resumed = kmeans(x, 12, niter=10, backend=backend, seed=1, checkpoint=path, checkpoint_every=3)
    np.testing.assert_allclose(resumed.centroids, full.centroids, atol=1e-6)
    np.testing.assert_array_equal(resumed.assign, full.assign)
    assert len(resumed.objective) == 10
    assert int(np.load(path)["iteration"]) == 9


def test_checkpoint_of_other_data_is_ignored(tmp_path):
    path = tmp_path / "ckpt.npz"
    x = blobs(500, 4, 3, seed=8)
    kmeans(x, 3, niter=4, backend="torch", checkpoint=path, checkpoint_every=2)
    other = kmeans(x + 5, 3, niter=4, backend="torch", checkpoint=path, checkpoint_every=2)
    fresh = kmeans(x + 5, 3, niter=4, backend="torch")
    np.testing.assert_allclose(other.centroids, fresh.centroids)


def test_bad_arguments():
    x = blobs(10, 2, 2, seed=9)
    with pytest.raises(ValueError):
        kmeans(x, 11)
    with pytest.raises(ValueError):
        kmeans(x, 2, init=np.zeros((3, 2), np.float32))


def test_pruned_lloyd_equals_plain_lloyd_and_skips_rows():
    """The bounds must change nothing but the work: same centroids as searching every row."""
    from lvd.index.kmeans import _Assignment

    x = blobs(4000, 16, 40, seed=10, spread=1.5)
    init = x[:40].copy()
    plain = kmeans(x, 40, niter=15, backend="torch", init=init, prune=False)
    pruned = kmeans(x, 40, niter=15, backend="torch", init=init)
    np.testing.assert_allclose(pruned.centroids, plain.centroids, atol=1e-6)
    np.testing.assert_array_equal(pruned.assign, plain.assign)
    np.testing.assert_allclose(pruned.objective, plain.objective, rtol=1e-6)
    bounds = _Assignment(x, TorchBackend("cpu", "fp32"))
    bounds.full(plain.centroids)
    nudged = plain.centroids.copy()
    nudged[0] += 1e-3
    bounds.refresh(plain.centroids, nudged)
    assert bounds.searched < len(x) // 4


def test_lloyd_over_faiss_searches_matches_faiss_kmeans():
    x = blobs(2000, 10, 8, seed=11, spread=2.0)
    init = x[:8].copy()
    ours = kmeans(x, 8, niter=8, backend="faiss", algorithm="lloyd", init=init)
    theirs = kmeans(x, 8, niter=8, backend="faiss", algorithm="faiss", init=init)
    np.testing.assert_allclose(ours.centroids, theirs.centroids, atol=1e-4)
    assert ours.inertia == pytest.approx(theirs.inertia, rel=1e-5)
    with pytest.raises(ValueError):
        kmeans(x, 8, backend="torch", algorithm="faiss")
