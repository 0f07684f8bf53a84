"""The exact -> IVF switch: taken at the measured crossover (timings mocked), and an IVF graph that
keeps its near-duplicate edges against brute-force numpy."""

import logging

import numpy as np
import pytest
from test_knn import clustered_with_copies, edges_above, numpy_graph

from lvd.index import ivf_switch, knn
from lvd.index.knn import KnnPlan, ivf_search, knn_graph


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LVD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def small_calibration(monkeypatch):
    """Calibration samples of 512 and 1024 rows, so a pool of a few thousand rows is 'large'."""
    monkeypatch.setattr(ivf_switch, "CALIBRATION_ROWS", (512, 1024))


def cost_model(a, c, b, calls):
    """A `measure` that reports exact = a n^2 and IVF = c n^b for the calibration jobs."""

    def measure(job, repeats):
        exact = job.func is ivf_switch._exact_graph
        rows = len(job.args[1] if exact else job.args[0])  # (engine, rows, ...) or (rows, k)
        calls.append(("exact" if exact else "ivf", rows))
        return a * rows**2 if exact else c * rows**b

    return measure


def counting_builds(monkeypatch):
    builds = []
    real = knn.build_ivf

    def build(*args, **kwargs):
        builds.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(knn, "build_ivf", build)
    return builds


def test_crossover_solves_the_two_cost_curves():
    a, c = 1e-9, 2e-7  # exact a n^2, IVF c n^1.5: equal where sqrt(n) = c / a, n = 40000
    t_exact = a * 8192**2
    t_ivf = (c * 8192**1.5, c * 16384**1.5)
    assert ivf_switch.crossover_rows(t_exact, 8192, t_ivf, (8192, 16384)) == pytest.approx(40000, rel=1e-9)
    # a linear IVF (b = 1): a n^2 = c n  ->  n = c / a
    assert ivf_switch.crossover_rows(t_exact, 8192, (c * 8192, c * 16384), (8192, 16384)) == pytest.approx(
        200, rel=1e-9
    )


def test_graph_switches_to_ivf_only_past_the_measured_crossover(fresh_cache, small_calibration, monkeypatch):
    x = clustered_with_copies(2800, 24, 200, seed=5)  # 3000 rows
    D_ref, I_ref = numpy_graph(x, 8)
    truth = edges_above(D_ref, I_ref, 0.9)
    assert len(truth) >= 150
    builds = counting_builds(monkeypatch)

    # crossover at (c / a)^2 = 2000^2 rows: far above the pool -> exact, equal to numpy
    calls = []
    D, I = knn_graph(x, 8, backend="faiss", measure=cost_model(1e-9, 2e-6, 1.5, calls))
    assert builds == [] and sorted(calls) == [("exact", 512), ("ivf", 512), ("ivf", 1024)]
    np.testing.assert_array_equal(np.sort(I, 1), np.sort(I_ref, 1))

    # crossover at 45^2 = 2025 rows, below the pool -> IVF, and still every near-duplicate edge
    monkeypatch.setenv("LVD_CACHE_DIR", "off")  # measure again, with other timings
    calls = []
    D, I = knn_graph(x, 8, backend="faiss", min_similarity=0.9, measure=cost_model(1e-9, 4.5e-8, 1.5, calls))
    assert builds == [3000] and len(calls) == 3
    found = edges_above(D, I, 0.9)
    assert len(truth & found) / len(truth) >= 0.999
    rows = np.repeat(np.arange(len(x)), 8)
    np.testing.assert_allclose(D.ravel(), (x[rows] * x[I.ravel()]).sum(1), atol=1e-5)  # IVF-Flat scores are exact


def test_the_crossover_is_measured_once_per_machine(fresh_cache, small_calibration):
    x = clustered_with_copies(2000, 16, 0, seed=6)
    calls = []
    measure = cost_model(1e-9, 2e-6, 1.5, calls)
    knn_graph(x, 4, backend="faiss", measure=measure)
    knn_graph(x, 4, backend="faiss", measure=measure)
    assert len(calls) == 3  # the second graph read the cached timings


def test_ivf_raises_nprobe_until_near_duplicate_edges_are_kept(caplog):
    x = clustered_with_copies(2800, 24, 200, seed=7)
    D_ref, I_ref = numpy_graph(x, 8)
    truth = edges_above(D_ref, I_ref, 0.9)
    plan = KnnPlan("ivf", "IVF128,Flat", 128, 1, "test")
    # one list of 128 per query loses edges: this is what the check must repair
    D_loose, I_loose = ivf_search(x, x, 8, plan, exclude_self=True)
    loose = len(truth & edges_above(D_loose, I_loose, 0.9)) / len(truth)
    assert loose < 0.99
    with caplog.at_level(logging.INFO, logger="lvd.index.knn"):
        D, I = knn_graph(x, 8, method="ivf", nlist=128, nprobe=1, min_similarity=0.9)
    found = edges_above(D, I, 0.9)
    assert len(truth & found) / len(truth) >= 0.995
    probes = [int(r.getMessage().split()[2]) for r in caplog.records if r.getMessage().startswith("IVF nprobe")]
    assert probes[0] == 1 and probes[-1] > 1 and probes == sorted(probes)


def test_checked_edges_are_the_threshold_edges_or_each_rows_nearest():
    D = np.array([[0.95, 0.5], [0.4, 0.3], [0.97, 0.93]], np.float32)
    I = np.array([[7, 8], [9, 3], [1, 2]])
    many = np.tile(D, (20, 1)), np.tile(I, (20, 1))  # 60 rows, 60 edges >= 0.9
    q, j = ivf_switch.check_edges(*many, 0.9)
    assert len(q) == 60 and set(j.tolist()) == {7, 1, 2}
    q, j = ivf_switch.check_edges(D, I, 0.9)  # 3 edges: too few, the MIN_CHECK_EDGES most similar instead
    assert q.tolist() == [0, 0, 1, 1, 2, 2] and j.tolist() == [7, 8, 9, 3, 1, 2]  # all 6 (fewer than 50)
    assert ivf_switch.edge_recall((q, j), np.array([[7, 0], [0, 0], [5, 1]])) == pytest.approx(2 / 6)
    sims = np.linspace(0.89, 0.0, 200, dtype=np.float32).reshape(100, 2)  # no edge >= 0.9: the 50 best stand in
    q, j = ivf_switch.check_edges(sims, np.arange(200).reshape(100, 2), 0.9)
    assert j.tolist() == list(range(50))
    q, j = ivf_switch.check_edges(D, I, None)  # distances: each row's nearest
    assert q.tolist() == [0, 1, 2] and j.tolist() == [7, 9, 1]
