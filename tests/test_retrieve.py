"""The retrieve stage against brute-force numpy on a synthetic run directory."""

import json

import numpy as np
import pandas as pd
import pytest

from lvd.curate.config import load_config
from lvd.curate.manifest import SCHEMA
from lvd.curate.retrieve import read_neighbors, run_retrieve


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def run_dir(tmp_path):
    """Manifest, embeddings, dedup and cluster outputs written by hand, following docs/architecture.md."""
    rng = np.random.default_rng(1)
    run = tmp_path / "run"
    n_pool, d = 300, 16
    centers = _unit(rng.normal(size=(5, d)))
    pool_c = rng.integers(0, 5, n_pool)
    pool_x = _unit(centers[pool_c] + 0.3 * rng.normal(size=(n_pool, d)))
    seed_sets = {"alpha": [0, 0, 1], "beta": [3, 3]}
    rows, xs, ids = [], [], []
    for i in range(n_pool):
        rows.append(
            {"id": 1000 + i, "set": "pool", "source": "/p", "kind": "folder", "key": f"{i}.png", "status": "ok"}
        )
    next_id = 5000
    for name, cs in seed_sets.items():
        for c in cs:
            rows.append(
                {
                    "id": next_id,
                    "set": f"seed:{name}",
                    "source": "/s",
                    "kind": "folder",
                    "key": f"{next_id}.png",
                    "label": f"c{c}",
                    "status": "ok",
                }
            )
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
    pd.DataFrame({"id": pool_ids, "component": pool_ids, "keep": pool_ids >= 1010}).to_parquet(
        run / "dedup" / "near.parquet", index=False
    )
    pd.DataFrame({"id": [1010], "eval_set": ["e"], "eval_id": [9], "similarity": [0.9]}).to_parquet(
        run / "dedup" / "decontam.parquet", index=False
    )
    pd.DataFrame({"id": [], "dup_of": []}).astype("int64").to_parquet(run / "dedup" / "exact.parquet", index=False)
    (run / "dedup" / "_SUCCESS.json").write_text("{}")
    (run / "cluster").mkdir()
    np.save(run / "cluster" / "centroids.npy", centers)
    pd.DataFrame({"id": pool_ids, "cluster": pool_c, "distance": np.zeros(n_pool, np.float32)}).to_parquet(
        run / "cluster" / "assign.parquet", index=False
    )
    (run / "cluster" / "_SUCCESS.json").write_text("{}")
    return run, all_ids, all_x.astype(np.float16).astype(np.float32), pool_c


@pytest.mark.parametrize("blocks", [False, True], ids=["whole", "blocks"])
def test_sample_mode_matches_brute_force(run_dir, monkeypatch, blocks):
    run, all_ids, all_x, pool_c = run_dir
    extra = []
    if blocks:  # 7 pool rows per block (the last holds 2, fewer than n), and the pool is never read whole
        import lvd.curate.retrieve as retrieve
        from lvd.index.io import EmbeddingRows

        def whole_matrix(self, dtype=None, copy=None):
            raise AssertionError("the whole pool was read into memory")

        monkeypatch.setattr(retrieve, "rows_per_block", lambda *a, **k: 7)
        monkeypatch.setattr(EmbeddingRows, "__array__", whole_matrix)
        extra = ["retrieve.per_set.beta.n=3"]  # one pass serves both sets, each with its own n
    cfg = load_config(
        None,
        [
            f"run_dir={run}",
            "retrieve.mode=sample",
            "retrieve.n=5",
            "progress=false",
            "retrieve.min_similarity=null",
            *extra,
        ],
    )
    run_retrieve(cfg)
    got = read_neighbors(run)
    surviving = (all_ids >= 1011) & (all_ids < 5000)
    base_ids, base_x = all_ids[surviving], all_x[surviving]
    for seed_id in range(5000, 5005):
        q = all_x[all_ids == seed_id][0]
        sims = base_x @ q
        n = 3 if blocks and seed_id >= 5003 else 5  # seeds 5003, 5004 are beta's
        top = base_ids[np.argsort(-sims, kind="stable")[:n]]
        mine = got[got.seed_id == seed_id].sort_values("rank")
        assert mine["id"].tolist() == top.tolist()
        assert np.allclose(mine["similarity"], np.sort(sims)[::-1][:n], atol=1e-5)
        assert (mine["mode"] == "sample").all()
        assert mine["cluster"].tolist() == [int(pool_c[i - 1000]) for i in mine["id"]]
    assert set(got.seed_set) == {"alpha", "beta"}
    assert not got["id"].isin(range(1000, 1011)).any()  # removed images are never retrieved


def test_cluster_mode_draws_from_the_seed_clusters_only(run_dir):
    run, all_ids, all_x, pool_c = run_dir
    cfg = load_config(
        None,
        [
            f"run_dir={run}",
            "retrieve.per_set.alpha.mode=cluster",
            "retrieve.per_set.alpha.m=20",
            "progress=false",
            "retrieve.min_similarity=null",
        ],
    )
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
    run_retrieve(
        load_config(
            None,
            [f"run_dir={run}", "retrieve.n=30", "retrieve.target=7", "retrieve.include_seeds=true", "progress=false"],
        )
    )
    got = read_neighbors(run)
    for name in ("alpha", "beta"):
        best = uncapped[uncapped.seed_set == name].groupby("id")["similarity"].max()
        expected = best.sort_values(ascending=False, kind="stable").index[:7]
        rows = got[(got.seed_set == name) & (got["mode"] == "sample")]
        assert sorted(rows["id"].unique()) == sorted(expected)
    seeds = got[got["mode"] == "seed"]
    assert sorted(seeds["id"]) == list(range(5000, 5005)) and (seeds["seed_id"] == seeds["id"]).all()


def test_unknown_per_set_key_is_an_error_that_leaves_the_finished_retrieval(run_dir):
    run, *_ = run_dir
    run_retrieve(load_config(None, [f"run_dir={run}", "progress=false"]))
    before = {p.name: p.read_bytes() for p in (run / "retrieve").iterdir()}
    cfg = load_config(None, [f"run_dir={run}", "retrieve.per_set.alpha.nn=3"])
    with pytest.raises(ValueError, match="nn"):
        run_retrieve(cfg)
    assert {p.name: p.read_bytes() for p in (run / "retrieve").iterdir()} == before


def _reference_floor(x: np.ndarray, quantile: float) -> float:
    """Brute force: the quantile of every seed's cosine to its nearest other seed."""
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.quantile(sims.max(axis=1), quantile))


@pytest.mark.parametrize("mode", ["sample", "cluster"])
def test_similarity_floor_removes_far_neighbours_and_keeps_near_ones(run_dir, mode):
    run, all_ids, all_x, pool_c = run_dir
    common = [f"run_dir={run}", f"retrieve.mode={mode}", "retrieve.n=40", "retrieve.m=40", "progress=false"]
    run_retrieve(load_config(None, [*common, "retrieve.min_similarity=null"]))
    unfloored = read_neighbors(run)
    floor = 0.8
    run_retrieve(load_config(None, [*common, f"retrieve.min_similarity={floor}"]))
    got = read_neighbors(run)
    expected = unfloored[unfloored["similarity"] >= floor]
    assert 0 < len(expected) < len(unfloored)  # the floor bites, and keeps something
    cols = ["seed_set", "seed_id", "id", "rank"]
    assert got[cols].values.tolist() == expected[cols].values.tolist()
    assert (got["floor"] == np.float32(floor)).all()
    info = __import__("json").loads((run / "retrieve" / "_SUCCESS.json").read_text())["seed_sets"]
    for name, rows in unfloored.groupby("seed_set"):
        rejected = len(set(rows["id"]) - set(rows.loc[rows["similarity"] >= floor, "id"]))
        assert info[name]["rejected_by_floor"] == rejected and info[name]["candidates"] == rows["id"].nunique()


def test_auto_floor_is_measured_per_label_from_the_seeds(run_dir):
    run, all_ids, all_x, pool_c = run_dir
    run_retrieve(
        load_config(None, [f"run_dir={run}", "retrieve.n=60", "retrieve.floor_quantile=0.5", "progress=false"])
    )
    got = read_neighbors(run)
    x = {i: all_x[all_ids == i][0] for i in range(5000, 5005)}
    # alpha: labels c0 (5000, 5001) and c1 (5002, alone: the set-wide floor); beta: c3 (5003, 5004)
    c0 = _reference_floor(np.stack([x[5000], x[5001]]), 0.5)
    alpha_all = _reference_floor(np.stack([x[5000], x[5001], x[5002]]), 0.5)
    c3 = _reference_floor(np.stack([x[5003], x[5004]]), 0.5)
    expect = {5000: c0, 5001: c0, 5002: alpha_all, 5003: c3, 5004: c3}
    for seed_id, floor in expect.items():
        mine = got[got.seed_id == seed_id]
        assert np.allclose(mine["floor"], floor, atol=1e-6)
        q = x[seed_id]
        surviving = (all_ids >= 1011) & (all_ids < 5000)
        sims = all_x[surviving] @ q
        top = all_ids[surviving][np.argsort(-sims, kind="stable")[:60]]
        near = set(top[np.sort(sims)[::-1][:60] >= floor - 1e-6])
        assert set(mine["id"]) == near  # far neighbours gone, near ones kept


def test_byte_identical_seeds_do_not_raise_the_auto_floor(run_dir):
    """Two copies of one seed file would put its nearest fellow at cosine 1 and the floor with it."""
    run, all_ids, all_x, pool_c = run_dir
    path = next((run / "manifest").glob("*.parquet"))
    manifest = pd.read_parquet(path)
    manifest["sha1"] = [f"{i:040x}" for i in manifest["id"]]
    manifest.loc[manifest["id"] == 5004, "sha1"] = f"{5003:040x}"  # beta's two seeds: one file twice
    manifest.to_parquet(path, index=False)
    x = all_x[all_ids == 5003][0]
    emb = np.load(run / "embed" / "part-00000.npy")
    emb[all_ids == 5004] = emb[all_ids == 5003]
    np.save(run / "embed" / "part-00000.npy", emb)
    run_retrieve(load_config(None, [f"run_dir={run}", "retrieve.n=5", "progress=false"]))
    beta = read_neighbors(run).query("seed_set == 'beta'")
    assert beta["floor"].isna().all() and len(beta) == 10  # one distinct seed: no floor, nothing rejected
    assert np.allclose(
        np.sort(beta["similarity"].to_numpy())[-1], np.max(all_x[(all_ids >= 1011) & (all_ids < 5000)] @ x), atol=1e-3
    )


@pytest.mark.slow
def test_two_torchrun_ranks_retrieve_like_one_process(run_dir, tmp_path):
    """`python -m lvd.curate.retrieve` under torchrun: 2 gloo ranks each search half the pool;
    neighbors.parquet equals one process's (a sample-mode and a cluster-mode set)."""
    import os
    import shutil
    import subprocess
    import sys

    from omegaconf import OmegaConf

    run, all_ids, all_x, _ = run_dir
    two = tmp_path / "two"
    shutil.copytree(run, two)
    settings = [
        "retrieve.n=7",
        "retrieve.per_set.beta.mode=cluster",
        "retrieve.per_set.beta.m=9",
        "progress=false",
        "retrieve.min_similarity=null",
        "memory_gb=0.000003",
    ]  # seeds gathered 2 at a time
    run_retrieve(load_config(None, [f"run_dir={run}", *settings]))
    config_file = tmp_path / "two.yaml"
    OmegaConf.save(load_config(None, [f"run_dir={two}", *settings]), config_file)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lvd.curate.retrieve",
        str(config_file),
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    one, sharded = read_neighbors(run), read_neighbors(two)
    pd.testing.assert_frame_equal(sharded, one)
    assert set(one["mode"]) == {"sample", "cluster"}
    assert json.loads((two / "retrieve" / "_SUCCESS.json").read_text())["world_size"] == 2
    # and the sharded nearest neighbours are brute force's
    surviving = (all_ids >= 1011) & (all_ids < 5000)
    base_ids, base_x = all_ids[surviving], all_x[surviving]
    for seed_id in (5000, 5001, 5002):
        sims = base_x @ all_x[all_ids == seed_id][0]
        got = sharded[(sharded.seed_id == seed_id) & (sharded["mode"] == "sample")].sort_values("rank")
        assert got["id"].tolist() == base_ids[np.argsort(-sims, kind="stable")[:7]].tolist()
