"""index.store and `lvd index build|add|search`: persistence, metadata, incremental add, CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from index_support import FIRST_ID, clustered_unit_vectors, photo_run, write_embed

from lvd.index import ann
from lvd.index.store import BuildOptions, IndexFolderError, IndexStore
from lvd.serve.cli import add_subcommands, main
from lvd.serve.run_inputs import add, build

EMBEDDER = {
    "model": "vit_tiny_p4",
    "weights": None,
    "resolution": 32,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "dim": 16,
    "cls_and_mean_patch": False,
}


def numpy_topk_ids(ids, xb, xq, k):
    sims = xq.astype(np.float64) @ xb.astype(np.float64).T
    return ids[np.argsort(-sims, axis=1, kind="stable")[:, :k]]


def as_stored(x):
    return x.astype(np.float16).astype(np.float32)


@pytest.fixture()
def photo_index(tmp_path):
    run = tmp_path / "run"
    rows, data = photo_run(run)
    ids = np.array([r["id"] for r in rows])
    x = clustered_unit_vectors(len(ids), 16, seed=2)
    write_embed(run / "embed", ids, x, part_rows=6, success=EMBEDDER)
    info = build(run / "embed", tmp_path / "index", BuildOptions(progress=False))
    return tmp_path / "index", rows, data, ids, as_stored(x), info


def test_build_records_choice_recall_embedder_and_metadata(photo_index):
    path, rows, _, ids, x, info = photo_index
    saved = json.loads((path / "info.json").read_text())
    assert saved == json.loads(json.dumps(info))
    assert saved["factory"] == "Flat" and saved["expected_recall"]["recall"] == 1.0
    assert saved["embedder"] == EMBEDDER  # what search --image needs to embed queries the same way
    assert [p for s in saved["sources"] for p in s["parts"]] == ["part-00000", "part-00001", "part-00002"]
    store = IndexStore.open(path)
    assert len(store) == len(rows)
    by_id = {r["id"]: r for r in rows}
    for row, id_ in enumerate(store.ids):  # metadata row r describes index row r
        meta = store.meta.iloc[row]
        assert meta["id"] == id_
        assert (meta["source"], meta["kind"], meta["key"], meta["set"]) == (
            by_id[id_]["source"],
            by_id[id_]["kind"],
            by_id[id_]["key"],
            by_id[id_]["set"],
        )


def test_search_by_vector_and_id_match_numpy(photo_index):
    path, _, _, ids, x, _ = photo_index
    store = IndexStore.open(path)
    q = clustered_unit_vectors(5, 16, seed=8)
    scores, rows = store.search(q, 5)
    np.testing.assert_array_equal(store.ids[rows], numpy_topk_ids(ids, x, q, 5))
    np.testing.assert_allclose(scores, np.sort(q @ x.T, axis=1)[:, ::-1][:, :5], atol=1e-5)
    for id_, v in zip(ids, x):
        np.testing.assert_array_equal(store.vector_of(int(id_)), v)
    assert store.results(*store.search(store.vector_of(FIRST_ID + 4), 1))[0][0]["id"] == FIRST_ID + 4
    with pytest.raises(KeyError):
        store.row_of(12345)
    with pytest.raises(ValueError, match="dimension"):
        store.search(np.ones((1, 7), np.float32))


def test_image_bytes_come_from_folder_files_and_tar_members(photo_index):
    path, rows, data, _, _, _ = photo_index
    store = IndexStore.open(path)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"folder", "tar"}
    for r in rows:
        assert store.image_bytes(r["id"]) == data[r["id"]]


def test_build_refuses_to_overwrite_and_reports_missing_input(tmp_path, photo_index):
    path = photo_index[0]
    with pytest.raises(IndexFolderError, match="already holds an index"):
        build(tmp_path / "run" / "embed", path)
    with pytest.raises(FileNotFoundError):
        build(tmp_path / "nowhere", tmp_path / "other")
    with pytest.raises(IndexFolderError, match="not an lvd index"):
        IndexStore.open(tmp_path)


def _two_halves(tmp_path, n=6000, d=24, queries=300):
    """Vectors to index and held-out queries from the same distribution."""
    x = clustered_unit_vectors(n + queries, d, n_clusters=30, spread=1.3, seed=4)
    ids = np.arange(n, dtype=np.int64) * 2 + 100
    return ids, x[:n], x[n:]


def test_incremental_add_equals_a_full_build(tmp_path):
    """Parts appearing later in the same embed folder, and a second embed folder, added without rebuild."""
    ids, x, q = _two_halves(tmp_path)
    write_embed(tmp_path / "full", ids, x, part_rows=1000, success=EMBEDDER)
    write_embed(tmp_path / "grow", ids[:3000], x[:3000], part_rows=1000, success=EMBEDDER)
    build(tmp_path / "full", tmp_path / "i_full", BuildOptions(progress=False))
    build(tmp_path / "grow", tmp_path / "i_inc", BuildOptions(progress=False))
    write_embed(tmp_path / "grow", ids[3000:5000], x[3000:5000], part_rows=1000, first_part=3)  # embed resumed
    write_embed(tmp_path / "more", ids[5000:], x[5000:], part_rows=1000, success=EMBEDDER)  # another folder
    add(tmp_path / "i_inc", tmp_path / "grow")
    info = add(tmp_path / "i_inc", tmp_path / "more")
    assert info["n"] == len(ids) and info["generation"] == "gen-000003"
    assert not (tmp_path / "i_inc" / "gen-000001").exists()  # superseded generations are removed
    full, inc = IndexStore.open(tmp_path / "i_full"), IndexStore.open(tmp_path / "i_inc")
    (sf, rf), (si, ri) = full.search(q, 10), inc.search(q, 10)
    np.testing.assert_array_equal(full.ids[rf], inc.ids[ri])
    np.testing.assert_allclose(sf, si, atol=1e-6)
    np.testing.assert_array_equal(inc.ids[ri], numpy_topk_ids(ids, as_stored(x), q, 10))
    # adding the same folders again changes nothing
    assert add(tmp_path / "i_inc", tmp_path / "more")["generation"] == "gen-000003"


def test_incremental_add_to_an_ivf_index_keeps_its_training_and_its_recall(tmp_path):
    ids, x, q = _two_halves(tmp_path, n=12_000, d=24)
    write_embed(tmp_path / "a", ids[:6000], x[:6000], part_rows=3000, success=EMBEDDER)
    write_embed(tmp_path / "b", ids[6000:], x[6000:], part_rows=3000, success=EMBEDDER)
    before = build(
        tmp_path / "a", tmp_path / "idx", BuildOptions(factory="IVF32,Flat", calibration_queries=300, progress=False)
    )
    after = add(tmp_path / "idx", tmp_path / "b")
    assert after["n"] == 12_000 and after["factory"] == before["factory"]
    assert after["expected_recall"]["queries"] == 300 and after["expected_recall"]["recall"] >= 0.95
    store = IndexStore.open(tmp_path / "idx")
    truth = numpy_topk_ids(ids, as_stored(x), q, 10)
    _, rows = store.search(q, 10)  # with the re-tuned nprobe
    assert ann.recall_at_k(store.ids[rows], truth) >= 0.93
    ann.set_search_params(store.index, {"nprobe": 32})  # every list: must be exact over all 12k rows
    _, rows = store.search(q, 10)
    np.testing.assert_array_equal(store.ids[rows], truth)


def test_add_skips_ids_already_indexed_and_refuses_another_model(tmp_path):
    ids, x, _ = _two_halves(tmp_path, n=300, d=16)
    write_embed(tmp_path / "a", ids[:200], x[:200], part_rows=100, success=EMBEDDER)
    write_embed(tmp_path / "b", ids[150:], x[150:], part_rows=100, success=EMBEDDER)
    build(tmp_path / "a", tmp_path / "idx", BuildOptions(progress=False))
    info = add(tmp_path / "idx", tmp_path / "b")
    store = IndexStore.open(tmp_path / "idx")
    assert info["n"] == 300 and sorted(store.ids.tolist()) == sorted(ids.tolist())
    write_embed(tmp_path / "c", ids[:10] + 1, x[:10], part_rows=100, success={**EMBEDDER, "model": "vit_tiny_p14"})
    with pytest.raises(IndexFolderError, match="embedded differently"):
        add(tmp_path / "idx", tmp_path / "c")


def test_a_killed_add_leaves_the_previous_index_usable(tmp_path, monkeypatch):
    ids, x, _ = _two_halves(tmp_path, n=400, d=16)
    write_embed(tmp_path / "a", ids[:200], x[:200], part_rows=100, success=EMBEDDER)
    write_embed(tmp_path / "b", ids[200:], x[200:], part_rows=100, success=EMBEDDER)
    build(tmp_path / "a", tmp_path / "idx", BuildOptions(progress=False))
    import lvd.index.store as store_mod

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        add(tmp_path / "idx", tmp_path / "b")
    monkeypatch.undo()
    store = IndexStore.open(tmp_path / "idx")
    assert len(store) == 200 and store.info["generation"] == "gen-000001"
    assert add(tmp_path / "idx", tmp_path / "b")["n"] == 400  # and the add can simply be run again


# ------------------------------------------------------------------------ CLI


def test_cli_build_prints_choice_and_search_prints_table_and_json(tmp_path, capsys):
    run = tmp_path / "run"
    rows, _ = photo_run(run)
    ids = np.array([r["id"] for r in rows])
    x = clustered_unit_vectors(len(ids), 16, seed=2)
    write_embed(run / "embed", ids, x, part_rows=8, success=EMBEDDER)
    assert main(["build", str(run / "embed"), "--out", str(tmp_path / "idx"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "chosen: Flat" in out and "expected recall@10" in out
    np.save(tmp_path / "q.npy", x[3])
    assert main(["search", str(tmp_path / "idx"), "--vector", str(tmp_path / "q.npy"), "-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [h["id"] for h in result[0]["results"]] == numpy_topk_ids(ids, as_stored(x), x[3:4], 3)[0].tolist()
    assert result[0]["results"][0]["key"] == rows[3]["key"]
    assert main(["search", str(tmp_path / "idx"), "--id", str(ids[13]), "-k", "2"]) == 0
    table = capsys.readouterr().out
    assert f"id {ids[13]}" in table and "shard-000000.tar::" in table and "score" in table
    assert main(["search", str(tmp_path / "idx"), "--id", "77"]) == 2
    assert "not in the index" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_subcommands_attach_to_a_parent_parser_and_show_defaults(capsys):
    parser = argparse.ArgumentParser(prog="lvd")
    index = parser.add_subparsers(dest="cmd").add_parser("index")
    add_subcommands(index.add_subparsers(dest="index_command", required=True))
    args = parser.parse_args(["index", "serve", "somewhere"])
    assert args.host == "127.0.0.1" and args.port == 8000 and callable(args.func)
    args = parser.parse_args(["index", "build", "emb", "--out", "idx"])
    assert args.factory == "auto" and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["index", "build", "--help"])
    assert "(default: auto)" in capsys.readouterr().out
