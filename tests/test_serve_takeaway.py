"""Results to take away: `lvd index search --out results.parquet` and `--out results/` (WebDataset shards),
read back with pandas and upstream webdataset, checked against numpy brute force and the run's own
truth, and fed to `lvd manifest` as a seed set; query arithmetic from the shell against numpy."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from index_support import embedded_photo_run, write_manifest

from lvd.index.store import BuildOptions, IndexStore
from lvd.serve.cli import main
from lvd.serve.query_mix import QueryPart, combine, parse_query
from lvd.serve.run_inputs import build

K = 4


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The photo run with labels on some rows and a cluster stage output, indexed exactly."""
    root = tmp_path_factory.mktemp("takeaway")
    run = root / "run"
    rows, data, x = embedded_photo_run(run)
    for i, row in enumerate(rows):
        row["label"] = ["cat", "rocket", None][i % 3]
    write_manifest(run, rows)
    ids = np.array([r["id"] for r in rows], np.int64)
    cluster = np.arange(len(ids)) % 4
    (run / "cluster").mkdir()
    pd.DataFrame({"id": ids, "cluster": cluster, "distance": np.float32(0)}).to_parquet(
        run / "cluster" / "assign.parquet"
    )
    build(run / "embed", root / "index", BuildOptions(factory="Flat", progress=False))
    return {
        "root": root,
        "rows": rows,
        "data": data,
        "ids": ids,
        "x": x.astype(np.float16).astype(np.float32),
        "cluster": cluster,
    }


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    q = np.asarray(q, np.float64)
    return np.argsort(-(x.astype(np.float64) @ (q / np.linalg.norm(q))), kind="stable")[:k]


def test_results_as_parquet_match_brute_force_and_the_run(photos, tmp_path):
    out = tmp_path / "results.parquet"
    queries = [int(photos["ids"][1]), int(photos["ids"][13])]
    argv = ["search", str(photos["root"] / "index"), "--id", *map(str, queries), "-k", str(K)]
    assert main([*argv, "--out", str(out), "--return-embeddings"]) == 0
    table = pd.read_parquet(out)
    assert list(table.columns[:8]) == ["query", "rank", "id", "score", "key", "set", "label", "cluster"]
    assert len(table) == 2 * K
    for qi, (name, group) in enumerate(table.groupby("query", sort=False)):
        rows = brute_force(photos["x"], photos["x"][1 if qi == 0 else 13], K)
        assert name == f"id {queries[qi]}" and group["rank"].tolist() == list(range(1, K + 1))
        assert group["id"].tolist() == photos["ids"][rows].tolist()
        want = photos["x"][rows].astype(np.float64) @ photos["x"][1 if qi == 0 else 13].astype(np.float64)
        np.testing.assert_allclose(group["score"], want, atol=1e-4)
        for r, hit in zip(rows, group.to_dict("records")):
            row = photos["rows"][r]
            label = None if pd.isna(hit["label"]) else hit["label"]  # pandas >= 3 reads a missing string as NaN
            assert (hit["key"], hit["set"], label) == (row["key"], row["set"], row["label"])
            assert hit["cluster"] == photos["cluster"][r]
            np.testing.assert_allclose(hit["embedding"], photos["x"][r], atol=1e-6)


def test_results_as_webdataset_shards_feed_the_manifest_as_a_seed_set(photos, tmp_path):
    import webdataset as wds

    from lvd.curate.config import load_config
    from lvd.curate.manifest import read_manifest, run_manifest

    folder = tmp_path / "found"
    queries = [int(photos["ids"][0]), int(photos["ids"][12])]
    argv = ["search", str(photos["root"] / "index"), "--id", *map(str, queries), "-k", "5", "--out", str(folder)]
    assert main(argv) == 0
    shards = sorted(folder.glob("results-*.tar"))
    assert [s.name for s in shards] == ["results-000000.tar"]
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    expected = {}
    for q, qrow in zip(queries, (0, 12)):
        for rank, r in enumerate(brute_force(photos["x"], photos["x"][qrow], 5), start=1):
            expected.setdefault(int(photos["ids"][r]), []).append((f"id {q}", rank, r))
    assert sorted(int(s["__key__"]) for s in samples) == sorted(expected)  # each image once
    for s in samples:
        id_ = int(s["__key__"])
        found = expected[id_]
        row = photos["rows"][found[0][2]]
        image_key = row["key"].rsplit(".", 1)[1]
        assert s[image_key] == photos["data"][id_]  # the original bytes
        meta = json.loads(s["json"])
        assert [(r["query"], r["rank"]) for r in meta["retrieved"]] == [(q, rank) for q, rank, _ in found]
        assert (meta["id"], meta["key"], meta["set"], meta["label"]) == (id_, row["key"], row["set"], row["label"])
        assert meta["cluster"] == photos["cluster"][found[0][2]]
        assert (s.get("label") or b"").decode() == (row["label"] or "")
    # the shards are a source lvd reads: a seed set, with its labels
    cfg = load_config(
        None,
        [f"run_dir={tmp_path / 'next'}", f'sources.pool=["{shards[0]}"]', f"sources.seeds.found={shards[0]}"]
        + ["progress=false", "workers=0"],
    )
    run_manifest(cfg)
    manifest = read_manifest(tmp_path / "next")
    seeds = manifest[manifest["set"] == "seed:found"]
    assert len(seeds) == len(expected) and (seeds["status"] == "ok").all()
    labels = {
        int(i): None if pd.isna(lab) else lab for i, lab in zip(seeds["key"].str.split(".").str[0], seeds["label"])
    }
    assert labels == {i: photos["rows"][f[0][2]]["label"] for i, f in expected.items()}
    # a folder that holds something already is never overwritten
    assert main([*argv[:-1], str(folder)]) == 2


def test_parse_query_reads_the_shell_syntax():
    parts = parse_query("+0.7 image:a.jpg +0.3 text:snow on the hills \u22120.2 text:people -id:42 +vector:q.npy")
    assert parts == [
        QueryPart(0.7, "image", "a.jpg"),
        QueryPart(0.3, "text", "snow on the hills"),
        QueryPart(-0.2, "text", "people"),
        QueryPart(-1.0, "id", 42),
        QueryPart(1.0, "embedding", "q.npy"),
    ]
    assert parse_query("text:a red car") == [QueryPart(1.0, "text", "a red car")]
    assert parse_query("image:x.png -.5 text:an image: of sorts") == [
        QueryPart(1.0, "image", "x.png"),
        QueryPart(-0.5, "text", "an image: of sorts"),  # kinds after the first only start a term with a sign
    ]
    assert parse_query("+1 text:a +1 colour:red") == [QueryPart(1.0, "text", "a +1 colour:red")]  # no such kind
    for bad in ("snow", "+0.5 text:", "+nan text:a", "+1 text:a -1 text:"):
        with pytest.raises(ValueError):
            parse_query(bad)


def test_combine_equals_numpy():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((3, 16)) * np.array([[1.0], [5.0], [0.1]])
    w = np.array([0.7, 0.3, -0.2])
    want = (w[:, None] * v / np.linalg.norm(v, axis=1, keepdims=True)).sum(0)
    got = combine(v, w)
    assert got.shape == (1, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], want / np.linalg.norm(want), atol=1e-6)
    with pytest.raises(ValueError, match="cancel out"):
        combine(np.stack([v[0], v[0]]), [1.0, -1.0])


def test_query_arithmetic_from_the_shell_equals_numpy(photos, tmp_path, capsys):
    """image:FILE (embedded by the index's model), vector:NPY and id:ID parts in one query."""
    from lvd.serve.query_embedding import embed_query_bytes, index_embedder

    store = IndexStore.open(photos["root"] / "index")
    image = tmp_path / "q.png"
    image.write_bytes(photos["data"][int(photos["ids"][3])])
    vec = np.random.default_rng(4).standard_normal(photos["x"].shape[1]).astype(np.float32)
    np.save(tmp_path / "v.npy", vec)
    query = f"+0.7 image:{image} +0.3 vector:{tmp_path / 'v.npy'} -0.2 id:{photos['ids'][9]}"
    assert main(["search", str(photos["root"] / "index"), "--query", query, "-k", str(K), "--json"]) == 0
    got = [h["id"] for h in json.loads(capsys.readouterr().out)[0]["results"]]
    img_vec = embed_query_bytes(index_embedder(store), [image.read_bytes()])[0]
    rows = np.stack([img_vec, vec, photos["x"][9]]).astype(np.float64)
    q = (np.array([0.7, 0.3, -0.2])[:, None] * rows / np.linalg.norm(rows, axis=1, keepdims=True)).sum(0)
    assert got == photos["ids"][brute_force(photos["x"], q, K)].tolist()
    assert main(["search", str(photos["root"] / "index"), "--query", "+1 image:/no/such.png"]) == 2
    assert main(["search", str(photos["root"] / "index"), "--text", "a cat"]) == 2
    assert "no text encoder" in capsys.readouterr().err
