"""Seedless curation: the balanced sample of a long-tailed pool becomes shards with provenance.

The pool is planted: real PNG files (so shards carry real bytes) in groups whose sizes fall off
like a long tail, with embeddings written per group. The checks count against the planted
groups, the manifest bytes and the upstream webdataset reader, not against lvd's own tables.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from lvd.curate.cluster import run_cluster
from lvd.curate.config import load_config
from lvd.curate.dedup import run_dedup
from lvd.curate.manifest import read_manifest, run_manifest
from lvd.curate.selection import balanced_size, resolve_select
from lvd.curate.shards import run_shards
from lvd.curate.stage import write_success

GROUPS = (300, 120, 50, 20, 8, 4)  # images per planted group: a long tail
DIM = 32


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def longtail_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("longtail")
    rng = np.random.default_rng(0)
    group_of = {}
    (root / "pool").mkdir()
    for g, size in enumerate(GROUPS):
        for j in range(size):
            name = f"g{g}-{j:03d}.png"
            pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)  # distinct bytes: no exact duplicates
            Image.fromarray(pixels).save(root / "pool" / name)
            group_of[name] = g
    overrides = [
        f"run_dir={root / 'run'}",
        f"sources.pool=[{root / 'pool'}]",
        "workers=0",
        "progress=false",
        "embed.copy_detection.weights=null",
        "dedup.threshold=0.9999",
        "decontam.threshold=0.9999",
        "cluster.method=hierarchical",
        "cluster.level_ks=[24]",
        "cluster.k=6",
        "cluster.spherical=true",
        "cluster.balanced_sample=60",
        "shards.max_count=25",
        "cluster.backend=faiss",
        "cluster.resample_steps=2",
    ]
    cfg = load_config(None, overrides)
    run_manifest(cfg)
    manifest = read_manifest(cfg.run_dir)
    centres = _unit(rng.normal(size=(len(GROUPS), DIM)))
    groups = manifest["key"].map(group_of).to_numpy()
    vectors = _unit(centres[groups] + rng.normal(scale=0.05, size=(len(groups), DIM)))  # well separated groups
    embed = Path(cfg.run_dir) / "embed"
    embed.mkdir(parents=True)
    np.save(embed / "part-00000.npy", vectors.astype(np.float16))
    np.save(embed / "ids-00000.npy", manifest["id"].to_numpy(np.int64))
    write_success(embed, model="synthetic", dim=DIM, copy_detection=None)
    run_dedup(cfg)
    run_cluster(cfg)
    run_shards(cfg)
    return cfg, manifest.assign(group=groups)


def _tv_from_uniform(counts):
    p = np.asarray(counts, float) / np.sum(counts)
    return 0.5 * np.abs(p - 1 / len(p)).sum()


@pytest.mark.slow
def test_the_balanced_sample_is_closer_to_uniform_over_groups_than_the_pool(longtail_run):
    cfg, manifest = longtail_run
    picked = pd.read_parquet(Path(cfg.run_dir) / "cluster" / "balanced.parquet")["id"]
    groups = manifest.set_index("id").loc[picked, "group"]
    drawn = np.bincount(groups, minlength=len(GROUPS))
    assert drawn.tolist() == _equal_shares(GROUPS, 60) == [12, 12, 12, 12, 8, 4]
    assert _tv_from_uniform(drawn) < 0.5 * _tv_from_uniform(GROUPS)  # pool: 0.50, balanced: 0.13


def _equal_shares(sizes, n):
    """Equal shares per group, a small group giving all it has and the rest shared by the others."""
    share, left = [0] * len(sizes), n
    open_groups = list(range(len(sizes)))
    while left and open_groups:
        each = max(1, left // len(open_groups))
        for g in sorted(open_groups, key=lambda g: sizes[g]):
            take = min(each, sizes[g] - share[g], left)
            share[g] += take
            left -= take
        open_groups = [g for g in open_groups if share[g] < sizes[g]]
    return share


def test_balanced_shards_read_back_with_webdataset_carry_the_source_bytes_and_provenance(longtail_run):
    cfg, manifest = longtail_run
    run_dir = Path(cfg.run_dir)
    picked = set(pd.read_parquet(run_dir / "cluster" / "balanced.parquet")["id"].tolist())
    by_id = manifest.set_index("id")
    level_sizes = []
    for t in (1, 2):
        assign = pd.read_parquet(run_dir / "cluster" / f"level{t}" / "assign.parquet")
        level_sizes.append((dict(zip(assign["id"], assign["cluster"])), np.bincount(assign["cluster"])))
    tars = sorted(str(p) for p in (run_dir / "shards").glob("curated-*.tar"))
    seen = set()
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        id_ = meta["id"]
        seen.add(id_)
        row = by_id.loc[id_]
        assert sample["png"] == (Path(row["source"]) / row["key"]).read_bytes()
        assert meta["selected_by"] == ["balanced"] and meta["retrieved"] == [] and meta["label"] is None
        assert [lv["level"] for lv in meta["balanced"]] == [1, 2]
        for lv, (cluster_of, sizes) in zip(meta["balanced"], level_sizes):
            assert lv["cluster"] == cluster_of[id_] and lv["cluster_size"] == sizes[cluster_of[id_]]
    assert seen == picked
    success = json.loads((run_dir / "shards" / "_SUCCESS.json").read_text())
    assert (
        success["samples"] == 60
        and success["select"] == "balanced"
        and success["selected"] == {"retrieve": 0, "balanced": 60}
    )


def test_select_auto_follows_the_seed_sets_and_sizes_the_balanced_sample(tmp_path):
    seedless = load_config(None, [f"run_dir={tmp_path}"])
    seeded = load_config(None, [f"run_dir={tmp_path}", f"sources.seeds.s={tmp_path}"])
    assert resolve_select(seedless) == "balanced" and resolve_select(seeded) == "retrieve"
    assert balanced_size(seedless, 1000) == 250 and balanced_size(seeded, 1000) == 0
    both = load_config(None, [f"run_dir={tmp_path}", f"sources.seeds.s={tmp_path}", "shards.select=both"])
    assert resolve_select(both) == "both" and balanced_size(both, 1000) == 250
    assert balanced_size(load_config(None, [f"run_dir={tmp_path}", "cluster.balanced_sample=7"]), 1000) == 7
