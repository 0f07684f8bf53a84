"""Linear probe: separable data, scikit-learn's logistic regression as the reference."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from lvd.pretrain.eval.linear import fit_linear_probe, stratified_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gaussians(n, d, n_classes, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d)) * 2.0
    y = np.arange(n) % n_classes
    rng.shuffle(y)
    return (centres[y] + spread * rng.normal(size=(n, d))).astype(np.float32), y


def test_separable_features_are_classified_almost_perfectly():
    x, y = _gaussians(1200, 24, 6, 0.3, seed=0)
    probe = fit_linear_probe(x[:900], y[:900], epochs=30, batch_size=256, lrs=(0.01, 0.1), weight_decays=(0.0,))
    assert (probe.predict(x[900:]) == y[900:]).mean() >= 0.99


def test_accuracy_matches_sklearn_logistic_regression_on_overlapping_classes():
    x, y = _gaussians(3000, 32, 8, 3.2, seed=1)
    x *= 1000.0  # a large feature scale: the probe must not depend on it
    xtr, ytr, xte, yte = x[:2000], y[:2000], x[2000:], y[2000:]
    probe = fit_linear_probe(xtr, ytr, epochs=40, batch_size=256)
    ours = (probe.predict(xte) == yte).mean()
    scaler = StandardScaler().fit(xtr)
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(xtr), ytr)
    theirs = (ref.predict(scaler.transform(xte)) == yte).mean()
    assert 0.55 < theirs < 0.97, theirs  # the test only means something when classes overlap
    assert abs(ours - theirs) <= 0.03, (ours, theirs)


def test_grid_is_searched_on_held_out_data_and_reported():
    x, y = _gaussians(600, 8, 3, 1.0, seed=2)
    probe = fit_linear_probe(x, y, lrs=(1e-6, 0.1), weight_decays=(0.0, 1e-3), epochs=10, batch_size=128)
    assert len(probe.val_accuracy) == 4
    # A learning rate of 1e-6 barely moves from zero weights: it must lose the selection.
    assert probe.lr == pytest.approx(0.1)
    assert max(probe.val_accuracy.values()) > 0.8
    assert all(v < 0.8 for k, v in probe.val_accuracy.items() if k.startswith("lr=1e-06"))


def test_stratified_split_holds_out_each_class_in_proportion():
    y = np.repeat(np.arange(4), [50, 20, 10, 1])
    fit, held = stratified_split(y, 0.2, seed=0)
    assert len(np.intersect1d(fit, held)) == 0 and len(fit) + len(held) == len(y)
    assert [int((y[held] == c).sum()) for c in range(4)] == [10, 4, 2, 0]
    assert set(y[fit]) == {0, 1, 2, 3}  # a singleton class stays in the training part
    again = stratified_split(y, 0.2, seed=0)
    np.testing.assert_array_equal(held, again[1])
