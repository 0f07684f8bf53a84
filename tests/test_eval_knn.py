"""Weighted k-NN against a brute-force numpy loop and against scikit-learn."""

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from lvd.pretrain.eval.knn import knn_accuracy, knn_scores, topk_accuracy, topk_cosine


def _clusters(n, d=16, n_classes=5, spread=1.2, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d))
    y = rng.integers(0, n_classes, size=n)
    return (centres[y] + spread * rng.normal(size=(n, d))).astype(np.float32), y


def _brute_force_scores(train_x, train_y, test_x, k, n_classes, temperature, uniform=False):
    """One query at a time, in float64: sort all similarities, vote with exp(sim / T)."""
    tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    te = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    out = np.zeros((len(te), n_classes))
    for i, q in enumerate(te.astype(np.float64)):
        sims = tr.astype(np.float64) @ q
        nn = np.argsort(-sims)[:k]
        for j in nn:
            out[i, train_y[j]] += 1.0 if uniform else np.exp(sims[j] / temperature)
    return out


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_topk_cosine_matches_brute_force(backend):
    xb, _ = _clusters(300, seed=1)
    xq, _ = _clusters(37, seed=2)
    sims, idx = topk_cosine(xb, xq, 25, backend=backend)
    nb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
    nq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    full = nq.astype(np.float64) @ nb.T.astype(np.float64)
    ref_idx = np.argsort(-full, axis=1)[:, :25]
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, np.take_along_axis(full, ref_idx, 1), atol=1e-5)


def test_weighted_scores_match_brute_force_for_every_k():
    train_x, train_y = _clusters(400, seed=3)
    test_x, _ = _clusters(50, seed=4)
    scores = knn_scores(train_x, train_y, test_x, (1, 10, 20, 100), n_classes=5)
    for k, s in scores.items():
        ref = _brute_force_scores(train_x, train_y, test_x, k, 5, 0.07)
        np.testing.assert_allclose(s, ref, rtol=1e-4)
        np.testing.assert_array_equal(s.argmax(1), ref.argmax(1))


def test_uniform_votes_equal_sklearn_kneighbors():
    train_x, train_y = _clusters(500, seed=5)
    test_x, _ = _clusters(120, seed=6)
    scores = knn_scores(train_x, train_y, test_x, (1, 7, 20), weighting="uniform", n_classes=5)
    for k, s in scores.items():
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(train_x, train_y)
        np.testing.assert_array_equal(s.argmax(1), ref.predict(test_x))
        np.testing.assert_allclose(s / k, ref.predict_proba(test_x), atol=1e-12)


def test_exp_weights_equal_sklearn_with_the_same_weight_function():
    train_x, train_y = _clusters(500, seed=7)
    test_x, _ = _clusters(120, seed=8)
    t = 0.07
    scores = knn_scores(train_x, train_y, test_x, (20,), temperature=t, n_classes=5)[20]
    # sklearn's cosine distance is 1 - similarity, so exp(sim / T) = exp((1 - d) / T).
    ref = KNeighborsClassifier(
        n_neighbors=20, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / t)
    ).fit(train_x, train_y)
    np.testing.assert_array_equal(scores.argmax(1), ref.predict(test_x))
    np.testing.assert_allclose(scores / scores.sum(1, keepdims=True), ref.predict_proba(test_x), atol=1e-6)


def test_temperature_changes_the_vote():
    # One very close neighbour of class 1 against two distant ones of class 0.
    train_x = np.array([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]], dtype=np.float32)
    train_y = np.array([1, 0, 0])
    q = np.array([[1.0, 0.9]], dtype=np.float32)
    sharp = knn_scores(train_x, train_y, q, (3,), temperature=0.07)[3]
    flat = knn_scores(train_x, train_y, q, (3,), weighting="uniform")[3]
    assert sharp.argmax() == 1 and flat.argmax() == 0


def test_k_larger_than_training_set_is_clamped_and_accuracy_is_reported():
    train_x, train_y = _clusters(30, n_classes=3, spread=0.1, seed=9)
    test_x, test_y = _clusters(20, n_classes=3, spread=0.1, seed=9)
    acc = knn_accuracy(train_x, train_y, test_x, test_y, (10, 200))
    assert set(acc) == {10, 200}
    assert acc[10]["top1"] == pytest.approx(1.0)
    assert "top5" not in acc[10]  # three classes: top-5 is meaningless
    ref = _brute_force_scores(train_x, train_y, test_x, 30, 3, 0.07)
    assert acc[200]["top1"] == pytest.approx(float((ref.argmax(1) == test_y).mean()))


def test_topk_accuracy_against_hand_computed_values():
    scores = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
    y = np.array([2, 0, 1])
    assert topk_accuracy(scores, y, 1) == pytest.approx(1 / 3)
    # Row 3 ties classes 0 and 1 for second place; the lower class wins, so it misses.
    assert topk_accuracy(scores, y, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, y, 3) == pytest.approx(1.0)


def test_chunked_accuracy_equals_brute_force_top1_and_top5():
    x, y = _clusters(345, n_classes=8, spread=2.5, seed=10)
    train_x, train_y, test_x, test_y = x[:300], y[:300], x[300:], y[300:]
    acc = knn_accuracy(train_x, train_y, test_x, test_y, (10, 50), backend="torch", query_chunk=7)
    for k in (10, 50):
        ref = _brute_force_scores(train_x, train_y, test_x, k, 8, 0.07)
        top5 = np.argsort(-ref, axis=1, kind="stable")[:, :5]
        assert acc[k]["top1"] == pytest.approx(float((ref.argmax(1) == test_y).mean()))
        assert acc[k]["top5"] == pytest.approx(float((top5 == test_y[:, None]).any(1).mean()))
        assert 0.2 < acc[k]["top1"] < acc[k]["top5"] < 1.0  # a case where the two differ
