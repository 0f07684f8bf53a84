"""The retrieve stage against brute-force numpy on a synthetic run directory."""


import numpy as np
import pandas as pd
import pytest

from curate.config import load_config
from curate.manifest import SCHEMA
from curate.retrieve import read_neighbors, run_retrieve


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def run_dir(tmp_path):
    """Manifest, embeddings, dedup and cluster outputs written by hand, following DESIGN.md."""
    rng = np.random.default_rng(1)
    run = tmp_path / "run"
    n_pool, d = 300, 16
    centers = _unit(rng.normal(size=(5, d)))
    pool_c = rng.integers(0, 5, n_pool)
    pool_x = _unit(centers[pool_c] + 0.3 * rng.normal(size=(n_pool, d)))
    seed_sets = {"alpha": [0, 0, 1], "beta": [3, 3]}
    rows, xs, ids = [], [], []
    for i in range(n_pool):
        rows.append({"id": 1000 + i, "set": "pool", "source": "/p", "kind": "folder", "key": f"{i}.png", "status": "ok"})
    next_id = 5000
    for name, cs in seed_sets.items():
        for c in cs:
            rows.append({"id": next_id, "set": f"seed:{name}", "source": "/s", "kind": "folder", "key": f"{next_id}.png", "label": f"c{c}", "status": "ok"})
            xs.append(_unit(centers[c : c + 1] + 0.2 * rng.normal(size=(1, d)))[0])
            ids.append(next_id)
            next_id += 1
    manifest = pd.DataFrame(rows)
    for col in SCHEMA.names:
        if col not in manifest:
            manifest[col] = None
    (run / "manifest").mkdir(parents=True)
    manifest[SCHEMA.names].to_parquet(run / "manifest" / "part-00000.parquet", index=False)
    all_ids = np.concatenate([np.arange(1000, 1000 + n_pool), np.array(ids)]).astype(np.int64)
    all_x = np.concatenate([pool_x, np.array(xs)])
    (run / "embed").mkdir()
    np.save(run / "embed" / "part-00000.npy", all_x.astype(np.float16))
    np.save(run / "embed" / "ids-00000.npy", all_ids)
    (run / "embed" / "_SUCCESS.json").write_text("{}")
    # dedup: ids 1000..1009 removed as near-duplicates, 1010 as an eval copy
    (run / "dedup").mkdir()
    pool_ids = np.arange(1000, 1000 + n_pool)
    pd.DataFrame({"id": pool_ids, "component": pool_ids, "keep": pool_ids >= 1010}).to_parquet(run / "dedup" / "near.parquet", index=False)
    pd.DataFrame({"id": [1010], "eval_set": ["e"], "eval_id": [9], "similarity": [0.9]}).to_parquet(run / "dedup" / "decontam.parquet", index=False)
    pd.DataFrame({"id": [], "dup_of": []}).astype("int64").to_parquet(run / "dedup" / "exact.parquet", index=False)
    (run / "dedup" / "_SUCCESS.json").write_text("{}")
    (run / "cluster").mkdir()
    np.save(run / "cluster" / "centroids.npy", centers)
    pd.DataFrame({"id": pool_ids, "cluster": pool_c, "distance": np.zeros(n_pool, np.float32)}).to_parquet(run / "cluster" / "assign.parquet", index=False)
    (run / "cluster" / "_SUCCESS.json").write_text("{}")
    return run, all_ids, all_x.astype(np.float16).astype(np.float32), pool_c


def test_sample_mode_matches_brute_force(run_dir):
    run, all_ids, all_x, pool_c = run_dir
    cfg = load_config(None, [f"run_dir={run}", "retrieve.mode=sample", "retrieve.n=5", "progress=false"])
    run_retrieve(cfg)
    got = read_neighbors(run)
    surviving = (all_ids >= 1011) & (all_ids < 5000)
    base_ids, base_x = all_ids[surviving], all_x[surviving]
    for seed_id in range(5000, 5005):
        q = all_x[all_ids == seed_id][0]
        sims = base_x @ q
        top = base_ids[np.argsort(-sims, kind="stable")[:5]]
        mine = got[got.seed_id == seed_id].sort_values("rank")
        assert mine["id"].tolist() == top.tolist()
        assert np.allclose(mine["similarity"], np.sort(sims)[::-1][:5], atol=1e-5)
        assert (mine["mode"] == "sample").all()
        assert mine["cluster"].tolist() == [int(pool_c[i - 1000]) for i in mine["id"]]
    assert set(got.seed_set) == {"alpha", "beta"}
    assert not got["id"].isin(range(1000, 1011)).any()  # removed images are never retrieved


def test_cluster_mode_draws_from_the_seed_clusters_only(run_dir):
    run, all_ids, all_x, pool_c = run_dir
    cfg = load_config(None, [f"run_dir={run}", "retrieve.per_set.alpha.mode=cluster", "retrieve.per_set.alpha.m=20", "progress=false"])
    run_retrieve(cfg)
    got = read_neighbors(run)
    alpha = got[got.seed_set == "alpha"]
    assert set(alpha["mode"]) == {"cluster"}
    clusters = set(alpha["cluster"])
    assert clusters <= {0, 1}
    for c in clusters:
        members = alpha[alpha.cluster == c]
        assert len(members) == min(20, int(((pool_c == c) & (np.arange(len(pool_c)) >= 11)).sum()))
        assert set(pool_c[members["id"].to_numpy() - 1000]) == {c}
    beta = got[got.seed_set == "beta"]
    assert set(beta["mode"]) == {"sample"}


def test_target_keeps_the_most_similar_and_seeds_can_be_included(run_dir):
    run, *_ = run_dir
    run_retrieve(load_config(None, [f"run_dir={run}", "retrieve.n=30", "progress=false"]))
    uncapped = read_neighbors(run)
    run_retrieve(load_config(None, [f"run_dir={run}", "retrieve.n=30", "retrieve.target=7", "retrieve.include_seeds=true", "progress=false"]))
    got = read_neighbors(run)
    for name in ("alpha", "beta"):
        best = uncapped[uncapped.seed_set == name].groupby("id")["similarity"].max()
        expected = best.sort_values(ascending=False, kind="stable").index[:7]
        rows = got[(got.seed_set == name) & (got["mode"] == "sample")]
        assert sorted(rows["id"].unique()) == sorted(expected)
    seeds = got[got["mode"] == "seed"]
    assert sorted(seeds["id"]) == list(range(5000, 5005)) and (seeds["seed_id"] == seeds["id"]).all()


def test_unknown_per_set_key_is_an_error(run_dir):
    run, *_ = run_dir
    cfg = load_config(None, [f"run_dir={run}", "retrieve.per_set.alpha.nn=3"])
    with pytest.raises(ValueError, match="nn"):
        run_retrieve(cfg)
