"""Both vector backends against brute-force numpy, and against each other."""

import numpy as np
import pytest

from lvd.common.devices import resolve_device
from lvd.index.backends import FaissBackend, TorchBackend, engine_dtype, get_backend


def unit_rows(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(xb, xq, k, metric, exclude_self=False):
    xb64, xq64 = xb.astype(np.float64), xq.astype(np.float64)
    if metric == "ip":
        score = xq64 @ xb64.T
    else:
        score = -((xq64[:, None, :] - xb64[None, :, :]) ** 2).sum(-1)
    if exclude_self:
        np.fill_diagonal(score, -np.inf)
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(score, order, 1)
    return (best if metric == "ip" else -best), order


BACKENDS = [("faiss", "auto"), ("torch", "fp32"), ("torch", "bf16")]


@pytest.mark.parametrize("name,dtype", BACKENDS)
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_search_matches_brute_force(name, dtype, metric):
    xb, xq = unit_rows(700, 24, 0) * 3, unit_rows(90, 24, 1)
    D, I = get_backend(name, "cpu", dtype).search(xb, xq, 7, metric=metric)
    D_ref, I_ref = brute_force(xb, xq, 7, metric)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name,dtype", BACKENDS)
def test_exclude_self_and_short_base(name, dtype):
    x = unit_rows(6, 8, 2)
    x[3] = x[2]  # an exact duplicate must be found, and self still left out
    D, I = get_backend(name, "cpu", dtype).search(x, x, 8, exclude_self=True)
    assert D.shape == I.shape == (6, 8)
    assert not (I == np.arange(6)[:, None]).any()
    assert (I[:, 5:] == -1).all() and np.isneginf(D[:, 5:]).all()  # only 5 other rows exist
    assert I[2, 0] == 3 and I[3, 0] == 2
    D_ref, I_ref = brute_force(x, x, 5, "ip", exclude_self=True)
    np.testing.assert_allclose(D[:, :5], D_ref, atol=1e-5)


@pytest.mark.parametrize("name,dtype", BACKENDS)
def test_assign_is_nearest_centroid(name, dtype):
    x, c = unit_rows(500, 16, 3) * 2, unit_rows(13, 16, 4)
    d2 = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    distance, index = get_backend(name, "cpu", dtype).assign(x, c)
    np.testing.assert_array_equal(index, d2.argmin(1))
    np.testing.assert_allclose(distance, d2.min(1), rtol=1e-5, atol=1e-5)


def test_bf16_candidates_are_proven_or_recomputed():
    """Near-ties defeat bf16 ranking; the proof must catch them and fp32 must redo those rows."""
    rng = np.random.default_rng(5)
    centre = unit_rows(1, 64, 6)
    # Many base rows almost equally similar to the query: gaps far below bf16's resolution.
    xb = centre + 1e-4 * rng.standard_normal((400, 64)).astype(np.float32)
    xb = np.concatenate([xb, unit_rows(400, 64, 7)]).astype(np.float32)
    xq = centre + 1e-4 * rng.standard_normal((20, 64)).astype(np.float32)
    engine = TorchBackend("cpu", "bf16", extra_candidates=4)
    D, I = engine.search(xb, xq, 5)
    assert engine.last_fallback_rows > 0
    D_ref, I_ref = FaissBackend("cpu").search(xb, xq, 5)
    np.testing.assert_allclose(D, D_ref, atol=1e-6)
    # Identical neighbour sets wherever scores are not tied in fp32.
    np.testing.assert_array_equal(np.sort(I, 1), np.sort(I_ref, 1))


def test_backends_agree_on_a_graph():
    x = unit_rows(1500, 48, 8)
    results = [get_backend(n, "cpu", d).search(x, x, 10, exclude_self=True) for n, d in BACKENDS]
    for D, I in results[1:]:
        np.testing.assert_array_equal(np.sort(I, 1), np.sort(results[0][1], 1))
        np.testing.assert_allclose(D, results[0][0], atol=1e-5)


def test_small_blocks_merge_exactly():
    """Column blocks and row chunks far smaller than the data must give the same answer."""
    xb, xq = unit_rows(1000, 8, 9), unit_rows(50, 8, 10)
    engine = TorchBackend("cpu", "fp32", block_bytes=4 * 64 * 100)
    engine._block_cols = lambda n: 64
    D, I = engine.search(xb, xq, 20)
    np.testing.assert_array_equal(I, brute_force(xb, xq, 20, "ip")[1])


def test_names_are_checked():
    with pytest.raises(ValueError):
        get_backend("annoy")
    with pytest.raises(ValueError):
        engine_dtype("fp8", resolve_device("cpu"))
    with pytest.raises(ValueError):
        get_backend("torch").search(unit_rows(3, 2, 0), unit_rows(3, 2, 0), 1, metric="cosine")
    assert engine_dtype("tf32", resolve_device("cpu")) == "fp32"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_half_matrix_graph_in_small_blocks(dtype, metric):
    """The graph sweep computes each pair once; with many tiny blocks every merge is exercised."""
    x = unit_rows(1000, 12, 11) * np.random.default_rng(12).uniform(0.5, 2, (1000, 1)).astype(np.float32)
    engine = TorchBackend("cpu", dtype, block_bytes=4 * 64 * 200)
    engine.half_matrix, engine.graph_rows = True, 64
    D, I = engine.search(x, x, 9, metric=metric, exclude_self=True)
    D_ref, I_ref = brute_force(x, x, 9, metric, exclude_self=True)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-4)
