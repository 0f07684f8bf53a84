"""index.ann: the automatic choice, and recall against brute-force numpy on held-out queries."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from index_support import clustered_unit_vectors, write_embed

from lvd.common.errors import MemoryBudgetError
from lvd.index import ann
from lvd.index.store import BuildOptions, IndexStore
from lvd.serve.run_inputs import build


def numpy_topk(xb: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product neighbours with plain numpy (the reference, independent of Faiss)."""
    sims = xq.astype(np.float64) @ xb.astype(np.float64).T
    part = np.argpartition(-sims, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def numpy_recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


@pytest.mark.parametrize(
    "n,d,budget,scan,family,factory_prefix",
    [
        (5_000, 64, 2**30, None, "flat", "Flat"),
        (50_000, 64, 2**30, 0.01, "ivf_flat", "IVF512,Flat"),
        (50_000, 64, 2**30, 0.10, "hnsw", "HNSW32"),  # weakly clustered data: IVF would scan 5000 vectors
        (50_000, 64, 8 * 2**20, 0.10, "ivf_pq", "IVF512,PQ"),  # ... but the graph does not fit
        (1_000_000, 128, 8 * 2**30, None, "ivf_flat", "IVF4096,Flat"),
        (1_000_000, 128, 8 * 2**30, 0.001, "ivf_flat", "IVF4096,Flat"),
        (10_000_000, 768, 8 * 2**30, None, "ivf_pq", "IVF16384,PQ"),
        (1_000_000, 768, 400 * 2**20, None, "ivf_pq", "IVF4096,PQ"),
    ],
)
def test_choice_follows_size_dimension_budget_and_clustering(n, d, budget, scan, family, factory_prefix):
    plan = ann.choose_index(n, d, budget, ivf_scan=scan)
    assert plan.family == family, plan
    assert plan.factory.startswith(factory_prefix)
    assert plan.bytes_per_vector * n <= budget  # what was chosen fits
    faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)  # and Faiss can build it
    if plan.family not in ("flat", "hnsw"):
        assert 0 < plan.train_size <= n


@pytest.mark.slow
@pytest.mark.parametrize("spread,family", [(0.5, "ivf_flat"), (3.0, "hnsw")])
def test_auto_build_turns_to_a_graph_when_ivf_must_scan_too_much(tmp_path, spread, family):
    """Tight clusters: IVF probes a few lists. Diffuse data: IVF would scan most lists, HNSW wins."""
    x = clustered_unit_vectors(25_000, 16, n_clusters=100, spread=spread, seed=1)
    write_embed(tmp_path / "embed", np.arange(len(x)), x, part_rows=25_000)
    info = build(tmp_path / "embed", tmp_path / "index", BuildOptions(calibration_queries=200, progress=False))
    assert info["plan"]["family"] == family, info["plan"]
    assert "IVF" in info["plan"]["reason"] and info["expected_recall"]["recall"] >= 0.95


def test_choice_refuses_an_impossible_budget():
    with pytest.raises(MemoryBudgetError, match="memory budget"):
        ann.choose_index(10_000_000, 768, 2**20)


def test_compressed_plan_drops_the_refine_stage_only_when_it_does_not_fit():
    roomy = ann.choose_index(1_000_000, 768, 1 * 2**30)
    tight = ann.choose_index(1_000_000, 768, 300 * 2**20)
    assert "Refine(SQ8)" in roomy.factory and "Refine" not in tight.factory


@pytest.mark.parametrize(
    "text,expected",
    [("8G", 8 * 2**30), ("512M", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30)), (1000, 1000), ("64k", 65536)],
)
def test_parse_bytes(text, expected):
    assert ann.parse_bytes(text) == expected


def test_parse_bytes_rejects_garbage():
    with pytest.raises(ValueError, match="not a size"):
        ann.parse_bytes("lots")


def test_invalid_factory_string_is_a_clear_error():
    with pytest.raises(ValueError, match="invalid Faiss factory"):
        ann.plan_from_factory("IVF12,Nonsense", 1000, 16)


def test_flat_equals_numpy_exact_search():
    x = clustered_unit_vectors(3000, 24, seed=1)
    xb, xq = x[:2500], x[2500:]
    plan = ann.choose_index(len(xb), 24, 2**30)
    index = ann.trained_index(plan, 24, None)
    ann.add_batches(index, [xb[:1000], xb[1000:]], progress=False)
    scores, found = index.search(xq, 10)
    truth = numpy_topk(xb, xq, 10)
    assert numpy_recall(found, truth) == 1.0
    np.testing.assert_allclose(scores, np.sort(xq @ xb.T, axis=1)[:, ::-1][:, :10], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW16,Flat", "IVF64,PQ16x4fs,Refine(SQ8)"])
def test_built_index_reaches_target_recall_on_held_out_queries(tmp_path, factory):
    """`lvd index build` tunes on held-back indexed vectors; queries never indexed must see that recall."""
    x = clustered_unit_vectors(12_500, 32, n_clusters=40, spread=1.2, seed=3)
    xb, xq = x[:12_000], x[12_000:]
    write_embed(tmp_path / "embed", np.arange(len(xb)) + 7, xb, part_rows=5000)
    xb16 = xb.astype(np.float16).astype(np.float32)  # what the embed parts hold
    info = build(
        tmp_path / "embed", tmp_path / "index", BuildOptions(factory=factory, calibration_queries=400, progress=False)
    )
    expected = info["expected_recall"]["recall"]
    assert "NaN" not in (tmp_path / "index" / "info.json").read_text()  # strict JSON: the page parses it
    assert expected >= 0.95 and info["search_params"] and info["expected_recall"]["queries"] == 400
    store = IndexStore.open(tmp_path / "index")
    _, rows = store.search(xq, 10)
    held_out = numpy_recall(store.ids[rows], numpy_topk(xb16, xq, 10) + 7)
    assert held_out >= 0.93, (factory, info["search_params"], held_out)
    assert abs(held_out - expected) < 0.04  # the recall written to info.json is a fair estimate


def test_tuning_picks_the_smallest_parameter_that_reaches_the_target():
    x = clustered_unit_vectors(8000, 16, n_clusters=30, spread=1.5, seed=5)
    xb, xq = x[:7800], x[7800:]
    index = ann.trained_index(ann.plan_from_factory("IVF64,Flat", len(xb), 16), 16, xb)
    index.add(xb)
    truth = numpy_topk(xb, xq, 10)
    params, recall = ann.tune(index, xq, truth, k=10, target=0.9)
    assert recall >= 0.9 and numpy_recall(index.search(xq, 10)[1], truth) == pytest.approx(recall)
    candidates = [v for v in ann.NPROBE_CANDIDATES if v <= 64]
    assert params["nprobe"] > 1
    for nprobe in candidates[: candidates.index(params["nprobe"])]:  # every smaller value misses the target
        ann.set_search_params(index, {"nprobe": nprobe})
        assert numpy_recall(index.search(xq, 10)[1], truth) < 0.9


def test_labels_map_rows_to_ids_when_tuning():
    x = clustered_unit_vectors(500, 8, seed=9)
    index = faiss.IndexFlatIP(8)
    index.add(x[:400])
    labels = np.arange(400) * 3 + 11
    _, recall = ann.tune(index, x[400:], numpy_topk(x[:400], x[400:], 5) * 3 + 11, k=5, labels=labels)
    assert recall == 1.0


def test_coarse_training_through_torch_kmeans_gives_a_working_ivf():
    """The GPU training path (torch k-means places the lists), run here on the CPU."""
    x = clustered_unit_vectors(6200, 16, n_clusters=30, spread=1.3, seed=6)
    xb, xq = x[:6000], x[6000:]
    index = faiss.index_factory(16, "IVF32,Flat", faiss.METRIC_INNER_PRODUCT)
    ann.train_coarse_with_torch(index, xb, device="cpu")
    centroids = index.quantizer.reconstruct_n(0, 32)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-4)  # spherical, as Faiss does
    index.train(xb)  # Faiss sees a trained quantizer and keeps it
    np.testing.assert_array_equal(index.quantizer.reconstruct_n(0, 32), centroids)
    index.add(xb)
    index.nprobe = 8
    assert numpy_recall(index.search(xq, 10)[1], numpy_topk(xb, xq, 10)) > 0.9


def test_training_stays_on_the_cpu_when_asked_or_when_no_gpu():
    assert ann.training_device("cpu") == "cpu"
    import torch

    if not torch.cuda.is_available() and faiss.get_num_gpus() == 0:
        assert ann.training_device("auto") == "cpu"
