"""k-NN graphs and searches against brute-force numpy."""

import numpy as np
import pytest

from lvd.index.knn import knn_graph, plan_knn, search


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_with_copies(n, d, n_copies, seed):
    """Blobs like image embeddings, plus near-duplicate copies of some rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 200), d))
    x = centres[rng.integers(0, len(centres), n)] + 0.7 * rng.standard_normal((n, d))
    originals = rng.choice(n, n_copies, replace=False)
    copies = x[originals] + 0.08 * rng.standard_normal((n_copies, d))
    return unit(np.concatenate([x, copies]))


def numpy_graph(x, k):
    s = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(s, -np.inf)
    top = np.argpartition(-s, k, axis=1)[:, :k]
    order = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable"), 1)
    return np.take_along_axis(s, order, 1), order


def edges_above(D, I, threshold):
    rows, cols = np.nonzero(D >= threshold)
    a, b = rows, I[rows, cols]
    return {(min(i, j), max(i, j)) for i, j in zip(a.tolist(), b.tolist())}


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_exact_graph_matches_numpy(backend):
    x = clustered_with_copies(1200, 32, 50, seed=0)
    D, I = knn_graph(x, 16, backend=backend)
    D_ref, I_ref = numpy_graph(x, 16)
    assert not (I == np.arange(len(x))[:, None]).any()
    np.testing.assert_array_equal(np.sort(I, 1), np.sort(I_ref, 1))
    np.testing.assert_allclose(D, D_ref, atol=1e-5)


def test_l2_graph_matches_numpy():
    x = np.random.default_rng(1).standard_normal((300, 5)).astype(np.float32)
    D, I = knn_graph(x, 4, metric="l2", backend="torch")
    d2 = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    np.testing.assert_array_equal(I, np.argsort(d2, 1, kind="stable")[:, :4])
    np.testing.assert_allclose(D, np.sort(d2, 1)[:, :4], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ivf_is_chosen_for_large_pools_and_keeps_near_duplicates():
    x = clustered_with_copies(3000, 48, 150, seed=2)
    plan = plan_knn(len(x), x.shape[1], exact_max=1000)
    assert plan.method == "ivf" and plan.factory.endswith(",Flat")
    D, I = knn_graph(x, 8, exact_max=1000)
    D_ref, I_ref = numpy_graph(x, 8)
    truth = edges_above(D_ref, I_ref, 0.9)
    found = edges_above(D, I, 0.9)
    assert len(truth) >= 150
    assert len(truth & found) / len(truth) >= 0.99
    # IVF-Flat scores are exact dot products: every reported similarity is the true one.
    rows = np.repeat(np.arange(len(x)), 8)
    true_sims = (x[rows] * x[I.ravel()]).sum(1)
    np.testing.assert_allclose(D.ravel(), true_sims, atol=1e-5)


def test_memory_budget_compresses_the_index():
    assert plan_knn(10**6, 384, memory_budget=1 << 30, exact_max=0).factory.endswith(",SQ8")
    assert ",PQ" in plan_knn(10**7, 384, memory_budget=1 << 30, exact_max=0).factory
    assert plan_knn(10**6, 384, method="exact").method == "exact"
    assert plan_knn(50_000, 384).method == "exact"
    assert plan_knn(500_000, 384, device="cpu", exact_max=100_000).method == "ivf"
    assert plan_knn(500_000, 384, device="cpu").method == "exact"  # a CPU switches only at a measured crossover


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_search_queries_against_a_base(backend):
    xb = clustered_with_copies(900, 16, 0, seed=3)
    xq = clustered_with_copies(40, 16, 0, seed=4)
    D, I = search(xb, xq, 5, backend=backend)
    s = xq.astype(np.float64) @ xb.astype(np.float64).T
    np.testing.assert_array_equal(I, np.argsort(-s, 1, kind="stable")[:, :5])
    np.testing.assert_allclose(D, -np.sort(-s, 1)[:, :5], atol=1e-5)


def test_k_larger_than_pool_pads():
    x = unit(np.eye(3) + 0.1)
    D, I = knn_graph(x, 5)
    assert (I[:, 2:] == -1).all() and np.isneginf(D[:, 2:]).all()
    assert set(I[0, :2]) == {1, 2}
