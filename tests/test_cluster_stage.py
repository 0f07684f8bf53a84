"""The cluster stage on a synthetic run directory: flat and hierarchical, resumable."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score
from test_dedup_stage import config, unit, write_run

import lvd.curate.cluster as cluster
import lvd.index.hierarchical as hierarchical
from lvd.curate.dedup import curated_pool_ids, run_dedup

DIM = 64


def planted_run(run_dir, seed=0):
    """3 well-separated groups of 4 sub-clusters each, plus an exact copy and an eval look-alike."""
    rng = np.random.default_rng(seed)
    supers = unit(rng.normal(size=(3, DIM)))
    rows, vecs, sub, sup = [], [], [], []
    next_id = 1
    for s in range(3):
        for j in range(4):
            centre = unit(supers[s] + rng.normal(scale=0.07, size=DIM))
            for _ in range(int(rng.integers(15, 60))):
                rows.append({"id": next_id * 11, "set": "pool", "sha1": f"{next_id:040x}"})
                vecs.append(unit(centre + rng.normal(scale=0.02, size=DIM)))
                sub.append(s * 4 + j)
                sup.append(s)
                next_id += 1
    truth = pd.DataFrame({"id": [r["id"] for r in rows], "sub": sub, "super": sup})
    truth = pd.concat([truth, pd.DataFrame({"id": [7], "sub": [sub[0]], "super": [sup[0]]})]).set_index("id")
    rows.append({"id": 7, "set": "pool", "sha1": rows[0]["sha1"]})  # exact copy of the first image
    vecs.append(vecs[0])
    rows.append({"id": 9, "set": "eval:e", "sha1": "e" * 40})
    vecs.append(unit(rng.normal(size=DIM)))
    rows.append({"id": 5, "set": "pool", "sha1": "f" * 40})  # an eval look-alike
    vecs.append(unit(vecs[-1] + rng.normal(scale=0.01, size=DIM)))
    write_run(run_dir, rows, np.stack(vecs))
    # within a sub-cluster images are near-duplicates at 0.9; dedup with a strict threshold
    run_dedup(config(run_dir, "dedup.threshold=0.9999"))
    return truth, np.stack(vecs)


def cluster_config(run_dir, *extra):
    return config(run_dir, "dedup.threshold=0.9999", *extra)


def test_flat_clusters_the_curated_pool(tmp_path):
    truth, vecs = planted_run(tmp_path)
    out = cluster.run_cluster(cluster_config(tmp_path, "cluster.k=3", "cluster.niter=10"))
    assign = pd.read_parquet(out / "assign.parquet")
    centroids = np.load(out / "centroids.npy")
    assert centroids.shape == (3, DIM)
    ids = curated_pool_ids(tmp_path)
    np.testing.assert_array_equal(assign["id"], ids)
    # the exact copy keeps the lower id (7, not 11); the eval look-alike (5) is gone
    assert 7 in set(assign["id"]) and 11 not in set(assign["id"]) and 5 not in set(assign["id"])
    assert adjusted_rand_score(truth.loc[assign["id"], "super"], assign["cluster"]) == pytest.approx(1.0)
    # every image is assigned to its nearest centroid, with its squared L2 distance (brute force)
    x = np.stack([vecs[truth.index.get_loc(i)] for i in assign["id"]]).astype(np.float16).astype(np.float32)
    d2 = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(assign["cluster"], d2.argmin(1))
    np.testing.assert_allclose(assign["distance"], d2.min(1), rtol=1e-4, atol=1e-5)
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert success["images"] == len(ids) and success["levels"][0]["k"] == 3


def test_hierarchical_levels_and_balanced_sample(tmp_path):
    truth, _ = planted_run(tmp_path)
    cfg = cluster_config(
        tmp_path,
        "cluster.method=hierarchical",
        "cluster.level_ks=[12]",
        "cluster.k=3",
        "cluster.resample_steps=[2,1]",
        "cluster.balanced_sample=60",
        "cluster.niter=10",
    )
    out = cluster.run_cluster(cfg)
    level1 = pd.read_parquet(out / "level1" / "assign.parquet")
    level2 = pd.read_parquet(out / "level2" / "assign.parquet")
    assert np.load(out / "level1" / "centroids.npy").shape == (12, DIM)
    assert np.load(out / "level2" / "centroids.npy").shape == (3, DIM)
    assert adjusted_rand_score(truth.loc[level2["id"], "super"], level2["cluster"]) == pytest.approx(1.0)
    assert adjusted_rand_score(truth.loc[level1["id"], "sub"], level1["cluster"]) > 0.9
    # the composition: level-2 cluster of an image = parent of its level-1 cluster
    parents = np.load(out / "level2" / "parents.npy")
    np.testing.assert_array_equal(level2["cluster"], parents[level1["cluster"]])
    # the flat layout repeats the last level
    pd.testing.assert_frame_equal(pd.read_parquet(out / "assign.parquet"), level2)
    # balanced: 20 images from each planted group although the groups are of unequal size
    picked = pd.read_parquet(out / "balanced.parquet")["id"]
    assert picked.is_unique and len(picked) == 60
    assert truth.loc[picked, "super"].value_counts().tolist() == [20, 20, 20]
    assert truth["super"].value_counts().max() > truth["super"].value_counts().min() + 5


@pytest.mark.slow
def test_killed_hierarchical_run_resumes_from_finished_levels(tmp_path, monkeypatch):
    settings = (
        "cluster.method=hierarchical",
        "cluster.level_ks=[12, 6]",
        "cluster.k=3",
        "cluster.resample_steps=1",
        "cluster.niter=8",
    )
    planted_run(tmp_path / "a")
    planted_run(tmp_path / "b")
    reference = cluster.run_cluster(cluster_config(tmp_path / "a", *settings))

    real = cluster.hierarchical_kmeans

    def killed_after_level_2(*args, on_level, **kwargs):
        def save_then_die(level, *rest):
            on_level(level, *rest)
            if level == 2:
                raise KeyboardInterrupt

        return real(*args, on_level=save_then_die, **kwargs)

    monkeypatch.setattr(cluster, "hierarchical_kmeans", killed_after_level_2)
    with pytest.raises(KeyboardInterrupt):
        cluster.run_cluster(cluster_config(tmp_path / "b", *settings))
    out = tmp_path / "b" / "cluster"
    # the killed run committed nothing; its finished levels wait in the work folder
    assert not (out / "_SUCCESS.json").exists() and (out / cluster.WORK / "level2" / "_SUCCESS.json").exists()
    assert not (out / "level1").exists()
    monkeypatch.undo()

    computed = []
    real_level = hierarchical.resampled_kmeans
    monkeypatch.setattr(
        hierarchical, "resampled_kmeans", lambda x, k, **kw: computed.append(k) or real_level(x, k, **kw)
    )
    cluster.run_cluster(cluster_config(tmp_path / "b", *settings))
    assert computed == [3]  # only the last level was left to do
    for t in (1, 2, 3):
        for name in ("centroids.npy", "parents.npy"):
            np.testing.assert_array_equal(np.load(out / f"level{t}" / name), np.load(reference / f"level{t}" / name))
        pd.testing.assert_frame_equal(
            pd.read_parquet(out / f"level{t}" / "assign.parquet"),
            pd.read_parquet(reference / f"level{t}" / "assign.parquet"),
        )

    # up to date: a rerun computes nothing; a changed setting recomputes
    computed.clear()
    cluster.run_cluster(cluster_config(tmp_path / "b", *settings))
    assert computed == []
    cluster.run_cluster(cluster_config(tmp_path / "b", *settings[:-1], "cluster.niter=9"))
    assert computed == [12, 6, 3]
    # fewer levels: the old level3/ goes; flat: all level folders go
    cluster.run_cluster(
        cluster_config(tmp_path / "b", "cluster.method=hierarchical", "cluster.level_ks=[12]", "cluster.k=3")
    )
    assert sorted(p.name for p in out.glob("level*")) == ["level1", "level2"]
    cluster.run_cluster(cluster_config(tmp_path / "b", "cluster.k=3"))
    assert not list(out.glob("level*")) and not (out / "kmeans-checkpoint.npz").exists()


def test_cluster_needs_dedup(tmp_path):
    with pytest.raises(FileNotFoundError, match="lvd dedup"):
        cluster.run_cluster(cluster_config(tmp_path))


def test_fewer_curated_images_than_clusters(tmp_path):
    planted_run(tmp_path)
    n = len(curated_pool_ids(tmp_path))
    out = cluster.run_cluster(
        cluster_config(
            tmp_path,
            "cluster.method=hierarchical",
            f"cluster.level_ks=[{n + 50}]",
            f"cluster.k={n + 10}",
            "cluster.niter=2",
        )
    )
    assert len(np.load(out / "level1" / "centroids.npy")) == n
    assign = pd.read_parquet(out / "level1" / "assign.parquet")
    assert assign["cluster"].nunique() == n and np.allclose(assign["distance"], 0, atol=1e-6)


def test_nothing_left_after_dedup_gives_empty_outputs(tmp_path):
    planted_run(tmp_path)
    run_dedup(config(tmp_path, "dedup.threshold=-1", "overwrite=true"))  # everything is one component ...
    run_dedup(config(tmp_path, "dedup.threshold=-1", "decontam.threshold=-1"))  # ... and contaminated
    assert len(curated_pool_ids(tmp_path)) == 0
    out = cluster.run_cluster(config(tmp_path, "dedup.threshold=-1", "decontam.threshold=-1"))
    assert len(pd.read_parquet(out / "assign.parquet")) == 0 and np.load(out / "centroids.npy").shape == (0, DIM)
    assert json.loads((out / "_SUCCESS.json").read_text())["images"] == 0


FLAT = ("cluster.k=12", "cluster.niter=8", "cluster.device=cpu")
HIERARCHICAL = (
    "cluster.method=hierarchical",
    "cluster.level_ks=[12]",
    "cluster.k=3",
    "cluster.resample_steps=[2,1]",
    "cluster.balanced_sample=60",
    "cluster.niter=8",
    "cluster.device=cpu",
)


# memory_gb of the one process and of each of two ranks: none, or past the budget (k-means on a
# sample; the two ranks' budgets add up to the one process's, so both draw the same sample)
SAMPLED = (("memory_gb=0.0002",), ("memory_gb=0.0001",))


@pytest.mark.parametrize(
    "settings,budgets",
    [(FLAT, ((), ())), (HIERARCHICAL, ((), ())), (FLAT, SAMPLED), (HIERARCHICAL, SAMPLED)],
    ids=["flat", "hierarchical", "flat-sampled", "hierarchical-sampled"],
)
@pytest.mark.slow
def test_two_torchrun_ranks_cluster_like_one_process(tmp_path, settings, budgets):
    """`python -m lvd.curate.cluster` under torchrun: 2 gloo ranks, each reading and iterating over half the rows
    (or, past the budget, half the sample, then assigning half the rows)."""
    import os
    import subprocess
    import sys

    from omegaconf import OmegaConf

    for name in ("one", "two"):
        planted_run(tmp_path / name)
    one = cluster.run_cluster(cluster_config(tmp_path / "one", *settings, *budgets[0]))
    config_file = tmp_path / "two.yaml"
    OmegaConf.save(cluster_config(tmp_path / "two", *settings, *budgets[1]), config_file)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lvd.curate.cluster",
        str(config_file),
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 of 2" in done.stderr  # both ranks took part
    two = tmp_path / "two" / "cluster"
    hierarchical = "cluster.method=hierarchical" in settings
    folders = ["", "level1", "level2"] if hierarchical else [""]
    for folder in folders:
        a, b = pd.read_parquet(one / folder / "assign.parquet"), pd.read_parquet(two / folder / "assign.parquet")
        assert len(a) > 300
        np.testing.assert_array_equal(b["id"], a["id"])
        np.testing.assert_array_equal(b["cluster"], a["cluster"])
        np.testing.assert_allclose(b["distance"], a["distance"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            np.load(two / folder / "centroids.npy"), np.load(one / folder / "centroids.npy"), atol=1e-5
        )
    assert pd.read_parquet(one / "assign.parquet")["cluster"].nunique() == (3 if hierarchical else 12)
    if hierarchical:
        pd.testing.assert_frame_equal(
            pd.read_parquet(two / "balanced.parquet"), pd.read_parquet(one / "balanced.parquet")
        )
        np.testing.assert_array_equal(np.load(two / "level2" / "parents.npy"), np.load(one / "level2" / "parents.npy"))
    success = json.loads((two / "_SUCCESS.json").read_text())
    assert success["world_size"] == 2 and success["images"] == len(pd.read_parquet(one / "assign.parquet"))
    assert (success["trained_on"] < success["images"]) == bool(budgets[1])
    assert success["trained_on"] == json.loads((one / "_SUCCESS.json").read_text())["trained_on"]
    assert not (two / "kmeans-checkpoint.npz").exists()


@pytest.mark.parametrize("settings", [FLAT, HIERARCHICAL], ids=["flat", "hierarchical"])
def test_a_failed_rerun_leaves_the_finished_clustering_as_it_was(tmp_path, monkeypatch, settings):
    planted_run(tmp_path)
    out = cluster.run_cluster(cluster_config(tmp_path, *settings))
    files = lambda: {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}  # noqa: E731
    before = files()

    def broken(*args, **kwargs):
        raise MemoryError("out of memory in the middle of k-means")

    monkeypatch.setattr(cluster, "resampled_kmeans", broken)
    monkeypatch.setattr(cluster, "hierarchical_kmeans", broken)
    with pytest.raises(MemoryError):
        cluster.run_cluster(cluster_config(tmp_path, *settings, "cluster.niter=7"))
    assert files() == before


@pytest.mark.parametrize(
    "settings",
    [
        ("cluster.k=3", "cluster.niter=10"),
        (
            "cluster.method=hierarchical",
            "cluster.level_ks=[12]",
            "cluster.k=3",
            "cluster.resample_steps=[1,0]",
            "cluster.niter=10",
        ),
    ],
    ids=["flat", "hierarchical"],
)
def test_past_the_memory_budget_kmeans_trains_on_a_sample_and_assigns_every_image_in_blocks(
    tmp_path, monkeypatch, settings
):
    truth, vecs = planted_run(tmp_path)

    def whole_matrix(self, dtype=None, copy=None):
        raise AssertionError("the whole pool was read into memory")

    monkeypatch.setattr(cluster.EmbeddingRows, "__array__", whole_matrix)
    monkeypatch.setattr(cluster, "DISTANCE_BLOCK", 64)  # several blocks
    out = cluster.run_cluster(cluster_config(tmp_path, "memory_gb=0.0001", *settings))  # a quarter: ~100 rows of d=64
    assign = pd.read_parquet(out / "assign.parquet")
    ids = curated_pool_ids(tmp_path)
    np.testing.assert_array_equal(assign["id"], ids)
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert success["images"] == len(ids) and 12 <= success["trained_on"] < len(ids) // 3
    assert adjusted_rand_score(truth.loc[assign["id"], "super"], assign["cluster"]) == pytest.approx(1.0)
    x = np.stack([vecs[truth.index.get_loc(i)] for i in assign["id"]]).astype(np.float16).astype(np.float32)
    level_one = out / ("level1" if "cluster.method=hierarchical" in settings else "")
    centroids = np.load(level_one / "centroids.npy")
    first = pd.read_parquet(level_one / "assign.parquet")
    d2 = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)  # brute force: every image at its nearest centroid
    np.testing.assert_array_equal(first["cluster"], d2.argmin(1))
    np.testing.assert_allclose(first["distance"], d2.min(1), rtol=1e-4, atol=1e-5)
