"""Both vector backends against brute-force numpy, and against each other."""

import numpy as np
import pytest
import torch

from lvd.common.devices import resolve_device
from lvd.index.backends import FaissBackend, TorchBackend, _LowPrecision, engine_dtype, get_backend, select_top


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


@pytest.mark.parametrize("near_copies,recomputed", [(400, "fp32"), (25, "bf16 retry")])
def test_bf16_candidates_are_proven_or_recomputed(near_copies, recomputed):
    """Near-ties defeat bf16 ranking; the proof must catch them. A few near-copies fit in a second
    bf16 pass with 4x the candidates; hundreds of them are recomputed in fp32."""
    rng = np.random.default_rng(5)
    centre = unit_rows(1, 64, 6)
    # Many base rows almost equally similar to the query: gaps far below bf16's resolution.
    xb = centre + 1e-4 * rng.standard_normal((near_copies, 64)).astype(np.float32)
    xb = np.concatenate([xb, unit_rows(400, 64, 7)]).astype(np.float32)
    xq = centre + 1e-4 * rng.standard_normal((20, 64)).astype(np.float32)
    engine = TorchBackend("cpu", "bf16", extra_candidates=4)
    D, I = engine.search(xb, xq, 5)
    assert engine.last_retry_rows > 0
    assert (engine.last_fallback_rows > 0) == (recomputed == "fp32")
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(100, 5), (4096, 64), (5003, 64), (70001, 64), (70001, 1), (9000, 2)])
def test_partial_selection_finds_the_k_largest(dtype, n, k):
    """select_top against numpy's sort, with ties, -inf and columns that fill no group."""
    rng = np.random.default_rng(n + k)
    values = rng.integers(-255, 256, (6, n)).astype(np.float32) / 4  # exact in bf16, many ties
    values[0, : n // 2] = -np.inf
    values[1, 7] = 1000.0  # one winner in a column of the first group
    values[2, -1] = 1000.0  # one winner among the tail columns
    scores = torch.from_numpy(values).to(dtype)
    v, j = select_top(scores, k)
    assert v.dtype == dtype and v.shape == j.shape == (6, k)
    expected = -np.sort(-values, axis=1)[:, :k]
    np.testing.assert_array_equal(v.float().numpy(), expected)
    np.testing.assert_array_equal(np.take_along_axis(values, j.numpy(), 1), expected)  # ids point at them
    assert all(len(set(row)) == k for row in j.numpy().tolist())  # k distinct columns


@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("fp32_output", [False, True])
@pytest.mark.parametrize("inputs", ["raw", "bf16-exact"])
def test_the_bf16_error_bound_holds_for_every_pair(biased, fp32_output, inputs):
    """No exact score (float64) exceeds its bf16-computed score by more than the proof's bound.

    The bound is checked at every pair's own approximate score, which is the tightest case of
    the proof (the bound grows no faster than the score). Rows of very different norms and
    near-duplicates make the rounding as large as it gets; inputs that bf16 holds exactly leave
    only the accumulation and output rounding, so a bound too small for those fails here."""
    rng = np.random.default_rng(13)
    d = 96
    base = rng.standard_normal((600, d)).astype(np.float32) * rng.uniform(0.01, 50, (600, 1)).astype(np.float32)
    base[300:] = base[:300] + 1e-3 * rng.standard_normal((300, d)).astype(np.float32)
    queries = np.concatenate([base[:40] * 1.0001, rng.standard_normal((40, d)).astype(np.float32) * 7])
    if inputs == "bf16-exact":
        base, queries = (torch.from_numpy(a).to(torch.bfloat16).float().numpy() for a in (base, queries))
    low = _LowPrecision(torch.from_numpy(base), "bf16")
    q_low, q_res = low.convert(torch.from_numpy(queries))
    if fp32_output:  # bf16 inputs, fp32 accumulation and result (what CUDA's out_dtype gives)
        approx = q_low.float() @ low.base.float().T
    else:  # the CPU's bf16 product, rounded to bf16 on the way out
        approx = (q_low @ low.base.T).float()
    exact = queries.astype(np.float64) @ base.astype(np.float64).T
    if biased:  # l2 ranking: x.b - |b|^2 / 2, the bias added in fp32 after the product
        bias = -0.5 * torch.linalg.vector_norm(torch.from_numpy(base), dim=1).square()
        approx = approx + bias
        exact = exact - 0.5 * (base.astype(np.float64) ** 2).sum(1)
    q_norm = q_low.float().norm(dim=1)
    worst = -np.inf
    for col in range(approx.shape[1]):
        last = approx[:, col]
        bound = low.error_bound(q_norm, q_res, last, fp32_output=fp32_output, biased=biased)
        excess = exact[:, col] - (last + bound).double().numpy()
        worst = max(worst, float(excess.max()))
    assert worst <= 0.0


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_bf16_search_of_long_rows_matches_brute_force(metric):
    """Rows long enough for the partial selection, in bf16 blocks, then proven: float32 answers."""
    xb = unit_rows(5000, 8, 14) * np.random.default_rng(15).uniform(0.5, 2, (5000, 1)).astype(np.float32)
    xb[2500:2600] = xb[:100] + 1e-4  # near-ties that bf16 cannot rank
    xq = np.concatenate([xb[:20] + 1e-5, unit_rows(20, 8, 16)])
    engine = TorchBackend("cpu", "bf16")
    D, I = engine.search(xb, xq, 40, metric=metric)
    D_ref, I_ref = brute_force(xb, xq, 40, metric)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-4)
    same = (np.sort(I, 1) == np.sort(I_ref, 1)).all(1)
    tied = np.abs(D_ref[:, -1:] - D_ref[:, -2:-1]) < 1e-5  # a tie at the k-th place may swap ids
    assert (same | tied[:, 0]).all()
