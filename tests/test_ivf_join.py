"""The inverted-file self-join (`index.ivf_join`) against brute-force numpy on planted near-duplicates."""

from __future__ import annotations

import numpy as np
import pytest

from lvd.common.run_folder import vector_files
from lvd.index import ivf_join
from lvd.index.components import cells_at_least, connected_components
from lvd.index.io import EmbeddingRows


def _folder(tmp_path, x, part=700):
    for p, start in enumerate(range(0, len(x), part)):
        np.save(tmp_path / f"part-{p:05d}.npy", x[start : start + part].astype(np.float16))
        np.save(tmp_path / f"ids-{p:05d}.npy", np.arange(start, min(start + part, len(x)), dtype=np.int64))
    return EmbeddingRows(vector_files(tmp_path), np.arange(len(x)))


def _pool(n=3000, d=32, copies=150, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, d)).astype(np.float32)
    x = centres[rng.integers(0, 30, n)] + 0.8 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n - copies, copies, replace=False)
    y = x[src] + 0.05 * rng.standard_normal((copies, d)).astype(np.float32)
    x[n - copies :] = y / np.linalg.norm(y, axis=1, keepdims=True)
    return x.astype(np.float16).astype(np.float32)  # as stored


def _brute_pairs(x, threshold):
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    i, j = np.nonzero(np.triu(sims >= threshold))
    return set(zip(i.tolist(), j.tolist())), sims


@pytest.mark.parametrize("flat_max", [4096, 2])  # one level of centroids, and two levels
def test_join_finds_the_pairs_numpy_finds_with_exact_cosines(tmp_path, monkeypatch, flat_max):
    monkeypatch.setattr(ivf_join, "FLAT_MAX_LISTS", flat_max)
    x = _pool()
    view = _folder(tmp_path, x)
    truth, sims = _brute_pairs(x, 0.9)
    assert len(truth) >= 150
    nlist = 24
    quantizer = ivf_join.train_quantizer(x[::3], nlist, seed=0)
    if flat_max == 2:
        assert quantizer.top is not None and quantizer.bounds[-1] == quantizer.nlist
    probes, gaps = ivf_join.probe_lists(view, quantizer, 16, block_rows=500, gaps=True)
    # the probes are each row's nearest lists, best first (flat: against numpy; two levels: the first is the nearest
    # among the scored cells, so only check ordering and distinctness)
    scores = x @ quantizer.centroids.T
    got = np.take_along_axis(scores, probes.astype(np.int64), 1)
    assert (np.diff(got, axis=1) <= 1e-6).all()
    assert all(len(set(r)) == probes.shape[1] for r in probes[:50].tolist())
    np.testing.assert_allclose(gaps, got[:, :1] - got, atol=2e-3)  # float16 gaps below the row's first list
    if quantizer.top is None:
        np.testing.assert_array_equal(probes[:, 0], scores.argmax(1))
    margin, recall, copy_recall, checked = ivf_join.choose_margin(view, probes, gaps, quantizer, 0.9, 16, seed=0)
    assert recall >= 0.999 and copy_recall >= 0.99 and checked >= 1024
    probes = ivf_join.within_margin(probes, gaps, margin)
    nprobe = probes.shape[1]
    assert (probes == -1).any()  # the margin leaves some rows fewer probes than others
    found = {}
    for i, j, s in ivf_join.join_lists(view, probes, nprobe, 0.9, k=16, nlist=quantizer.nlist, block_bytes=1 << 16):
        for a, b, c in zip(i.tolist(), j.tolist(), s.tolist()):
            found[(min(a, b), max(a, b))] = c
    assert set(found) <= truth  # nothing below the threshold, no self pairs
    missed = truth - set(found)
    assert len(missed) <= 0.01 * len(truth)
    # a missed pair is one the join never compared: neither row's list among the other's probes
    for a, b in missed:
        assert not ivf_join.linked(probes[[a]], probes[[b]])[0]
    pairs = np.array(sorted(found))
    np.testing.assert_allclose(
        [found[p] for p in map(tuple, pairs.tolist())], sims[pairs[:, 0], pairs[:, 1]], rtol=0, atol=1e-5
    )


def test_with_every_list_probed_the_join_is_exact(tmp_path):
    x = _pool(n=1200, copies=60, seed=1)
    view = _folder(tmp_path, x, part=500)
    quantizer = ivf_join.train_quantizer(x, 8, seed=0)
    probes = ivf_join.probe_lists(view, quantizer, 8)
    truth, _ = _brute_pairs(x, 0.85)
    found = set()
    for i, j, _ in ivf_join.join_lists(view, probes, 8, 0.85, k=10**6, nlist=8, block_bytes=1 << 12):
        found |= {(min(a, b), max(a, b)) for a, b in zip(i.tolist(), j.tolist())}
    assert found == truth


def test_within_margin_keeps_the_lists_scoring_within_it_of_the_nearest():
    x = _pool(n=400, d=16, copies=0, seed=5)
    quantizer = ivf_join.Quantizer(x[:30].copy())
    lists, scores = ivf_join.nearest_lists(x, quantizer, 10, scores=True)
    probes = ivf_join.within_margin(lists, (scores[:, :1] - scores).astype(np.float16), 0.1)
    sims = x @ x[:30].T
    for row in range(len(x)):
        want = np.flatnonzero(sims[row] >= sims[row].max() - 0.1)
        if len(want) > 10:  # at most the 10 stored
            want = np.argsort(-sims[row])[:10]
        got = probes[row][probes[row] >= 0]
        assert got[0] == sims[row].argmax()
        assert set(got.tolist()) == set(want.tolist()), row
    assert probes.shape[1] == max(int((probes[r] >= 0).sum()) for r in range(len(x)))
    assert 1 < (probes >= 0).sum(1).mean() < 10


def test_at_most_k_partners_per_row_and_list_the_best(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.standard_normal(16).astype(np.float32)
    x = base + 0.01 * rng.standard_normal((40, 16)).astype(np.float32)  # 40 copies of one image
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    view = _folder(tmp_path, x)
    probes = np.zeros((40, 1), np.int32)  # one list
    i, j, s = map(np.concatenate, zip(*ivf_join.join_lists(view, probes, 1, 0.5, k=3, nlist=1)))
    assert np.bincount(i, minlength=40).tolist() == [3] * 40
    stored = x.astype(np.float16).astype(np.float32)
    sims = stored @ stored.T
    np.fill_diagonal(sims, -np.inf)
    for row in range(40):
        np.testing.assert_allclose(np.sort(s[i == row]), np.sort(sims[row])[-3:], atol=1e-5)


def test_edge_forest_keeps_the_components(tmp_path):
    rng = np.random.default_rng(0)
    n = 500
    rows, cols = rng.integers(0, n, 700), rng.integers(0, n, 700)
    forest = ivf_join.EdgeForest(n, max_edges=0)  # compressed after every add
    for start in range(0, 700, 50):
        forest.add(rows[start : start + 50], cols[start : start + 50])
    assert len(forest.edges()[0]) < n
    np.testing.assert_array_equal(connected_components(n, *forest.edges()), connected_components(n, rows, cols))


def test_exact_neighbors_equal_numpy(tmp_path):
    x = _pool(n=900, copies=30)
    view = _folder(tmp_path, x, part=250)
    rows = np.array([0, 5, 250, 899])
    D, I = ivf_join.exact_neighbors(view, rows, 7, threshold=-2.0, block_rows=100)  # -2: every other row counts
    sims = x[rows] @ x.T
    sims[np.arange(4), rows] = -np.inf
    np.testing.assert_allclose(D, -np.sort(-sims, axis=1)[:, :7], atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(sims, I, 1), D, atol=1e-5)


# 2: the pass keeps only each row's best k as it goes; 40: the cap binds only for row 0 and its copies
@pytest.mark.parametrize("k", [2, 40])
def test_exact_neighbors_above_a_threshold_equal_numpy(tmp_path, k):
    x = _pool(n=900, copies=120, seed=3)
    x[600:690] = x[0] + 1e-3 * np.arange(90)[:, None]  # 90 near copies of row 0: more than k above the threshold
    view = _folder(tmp_path, x, part=250)
    x = np.asarray(view)  # as stored
    rows = np.array([0, 5, 250, 640, 780, 899])
    D, I = ivf_join.exact_neighbors(view, rows, k, threshold=0.9, block_rows=100)
    sims = x[rows] @ x.T
    sims[np.arange(len(rows)), rows] = -np.inf
    for r in range(len(rows)):
        above = np.flatnonzero(sims[r] >= 0.9)
        want = np.sort(sims[r, above])[::-1][:k]
        np.testing.assert_allclose(D[r, : len(want)], want, atol=1e-6)
        assert (D[r, len(want) :] == -np.inf).all() and (I[r, len(want) :] == -1).all()
        np.testing.assert_allclose(sims[r, I[r, : len(want)]], want, atol=1e-6)
    assert (D >= 0.9).sum(1).max() == k  # row 0 and its copies have more than k


def test_threshold_copies_sit_at_the_threshold():
    x = _pool(n=200, copies=0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = ivf_join.threshold_copies(x, 0.8, seed=3)
    np.testing.assert_allclose((x * y).sum(1), 0.8, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    u = (y - 0.8 * x) / 0.6  # unit directions orthogonal to their rows, drawn independently
    np.testing.assert_allclose((u * x).sum(1), 0.0, atol=1e-5)
    assert abs((u @ u.T)[np.triu_indices(200, 1)].mean()) < 0.02


def test_lists_are_numbered_in_the_narrowest_integer_and_cells_found_like_numpy():
    assert ivf_join.list_dtype(32768) == np.int16 and ivf_join.list_dtype(32769) == np.int32
    x = _pool(n=500, d=16, copies=20, seed=2)
    quantizer = ivf_join.Quantizer(x[:40].copy())
    lists = ivf_join.nearest_lists(x, quantizer, 5)
    np.testing.assert_array_equal(lists[:, 0], (x @ x[:40].T).argmax(1))
    sims = x @ x.T
    rows, cols = cells_at_least(sims, 0.8)
    ref_rows, ref_cols = np.nonzero(sims >= 0.8)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_array_equal(cols, ref_cols)
    assert len(rows) > 500  # the diagonal and the copies
    sims[3, 7] = sims[9, :] = np.nan  # NaN is below every threshold and hides no other entry of its row
    rows, cols = cells_at_least(sims, 0.8)
    ref_rows, ref_cols = np.nonzero(sims >= 0.8)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_array_equal(cols, ref_cols)
    assert 3 in rows and 9 not in rows
    assert [len(a) for a in cells_at_least(np.zeros((4, 0), np.float32), 0.5)] == [0, 0]


def _numpy_join(x, probes, nprobe, threshold, k):
    """The join's directed pairs by its definition, list by list in plain numpy: the rows probing a list
    against its members, the pairs >= threshold, no self pair, each row's k best per list."""
    found, capped = {}, 0
    for lst in np.unique(probes[:, :nprobe]):
        query = np.flatnonzero((probes[:, :nprobe] == lst).any(1))
        base = np.flatnonzero(probes[:, 0] == lst)
        sims = x[query] @ x[base].T
        sims[query[:, None] == base[None, :]] = -np.inf
        for r, row in enumerate(query):
            hits = np.flatnonzero(sims[r] >= threshold)
            capped += len(hits) > k
            for c in hits[np.argsort(-sims[r, hits], kind="stable")][:k]:
                found[(lst, int(row), int(base[c]))] = float(sims[r, c])
    return found, capped


# products in blocks of 7 query rows, and in one block per list; lists in this thread, and on 3 threads; rows read
# group by group from the mapped parts, and from rows held in memory
@pytest.mark.parametrize("chunk, workers, held", [(7, 1, False), (1024, 1, False), (7, 3, False), (7, 3, True)])
def test_join_gives_the_pairs_and_cosines_of_its_definition(tmp_path, monkeypatch, chunk, workers, held):
    monkeypatch.setattr(ivf_join, "JOIN_CHUNK", chunk)
    x = _pool(n=1500, d=24, copies=80, seed=4)
    view = _folder(tmp_path, x, part=400)
    view = view.held() if held else view
    quantizer = ivf_join.train_quantizer(x, 12, seed=0)
    probes = ivf_join.probe_lists(view, quantizer, 4)
    probes[::5, 2] = -1  # probes a margin left out: those rows are queries of their first two lists only
    truth, capped = _numpy_join(x, probes, 3, 0.6, 5)
    assert capped > 0  # the k cap binds for some rows
    got = {}
    blas = ivf_join.blas_threads()
    lists_seen = []
    for i, j, s in ivf_join.join_lists(view, probes, 3, 0.6, k=5, nlist=12, block_bytes=1 << 15, workers=workers):
        assert s.dtype == np.float32
        lists_seen.append(int(probes[j[0], 0]))
        lists = probes[j, 0]  # a member's list is the list it was found in
        got.update({(int(lst), int(a), int(b)): float(c) for lst, a, b, c in zip(lists, i, j, s)})
    assert set(got) == set(truth)
    assert lists_seen == sorted(lists_seen)  # list by list, in order, however many threads
    assert ivf_join.blas_threads() == blas  # the BLAS's threads are given back
    keys = sorted(truth)
    np.testing.assert_allclose([got[key] for key in keys], [truth[key] for key in keys], rtol=0, atol=1e-5)


def test_a_nan_product_hides_no_other_pair_of_its_row(tmp_path):
    """The scan first takes each product row's largest value: NaN must not make a row look empty."""
    x = _pool(n=300, d=16, copies=20, seed=2)
    x[5] = np.nan  # a broken vector: every product with it is NaN
    view = _folder(tmp_path, x, part=100)
    probes = np.zeros((len(x), 1), np.int32)  # one list: every row meets every other
    clean = np.delete(np.arange(len(x)), 5)
    truth, _ = _brute_pairs(x[clean], 0.9)
    truth = {(int(clean[a]), int(clean[b])) for a, b in truth}
    found = set()
    for i, j, _ in ivf_join.join_lists(view, probes, 1, 0.9, k=10**6, nlist=1, workers=2):
        found |= {(min(a, b), max(a, b)) for a, b in zip(i.tolist(), j.tolist())}
    assert len(truth) >= 20 and found == truth
