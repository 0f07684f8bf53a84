"""The shards stage, read back with the upstream webdataset reader and checked byte for byte."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from lvd.curate.config import load_config
from lvd.curate.manifest import read_manifest, run_manifest
from lvd.curate.shards import plan_shards, run_shards


def _img(seed, fmt, size=(24, 16)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture()
def run(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(20):
        (pool / f"p{i:02d}.{'png' if i % 3 else 'jpg'}").write_bytes(_img(i, "PNG" if i % 3 else "JPEG"))
    with wds.TarWriter(str(tmp_path / "extra.tar")) as sink:
        for i in range(5):
            sink.write({"__key__": f"t{i}", "webp": _img(100 + i, "WEBP")})
    seeds = tmp_path / "seeds"
    for cls in ("ant", "bee"):
        (seeds / cls).mkdir(parents=True)
        for j in range(2):
            (seeds / cls / f"{j}.png").write_bytes(_img(hash((cls, j)) % 1000, "PNG"))
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f'sources.pool=["{pool}","{tmp_path / "extra.tar"}"]',
        f"sources.seeds.insects={seeds}",
        "workers=0",
        "progress=false",
        "shards.max_count=7",
        "embed.copy_detection.weights=null",
    ]
    cfg = load_config(None, overrides)
    run_manifest(cfg)
    manifest = read_manifest(cfg.run_dir)
    seed_rows = manifest[manifest.set == "seed:insects"].sort_values("key")
    pool_ids = manifest[manifest.set == "pool"]["id"].to_numpy()
    rng = np.random.default_rng(0)
    rows = []
    for s, seed_id in enumerate(seed_rows["id"]):
        for rank, pid in enumerate(rng.choice(pool_ids, size=6, replace=False), start=1):  # overlaps between seeds
            rows.append(
                {
                    "seed_set": "insects",
                    "seed_id": int(seed_id),
                    "id": int(pid),
                    "rank": rank,
                    "similarity": float(1 - rank / 10 - s / 100),
                    "mode": "sample",
                    "cluster": int(rank % 3),
                    "floor": 0.0,
                }
            )
    neighbors = pd.DataFrame(rows)
    (Path(cfg.run_dir) / "retrieve").mkdir(parents=True)
    neighbors.to_parquet(Path(cfg.run_dir) / "retrieve" / "neighbors.parquet", index=False)
    return cfg, manifest, neighbors


def _original_bytes(kind, source, key):
    if kind == "tar":
        with tarfile.open(source) as tar:
            return tar.extractfile(key).read()
    return (Path(source) / key).read_bytes()


def test_shards_read_back_with_webdataset_match_the_sources(run):
    cfg, manifest, neighbors = run
    out = run_shards(cfg)
    tars = sorted(out.glob("curated-*.tar"))
    distinct = neighbors["id"].nunique()
    assert len(tars) == -(-distinct // 7)
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False))
    assert len(samples) == distinct
    assert len({s["__key__"] for s in samples}) == distinct
    by_id = manifest.set_index("id")
    seed_label = by_id["label"].to_dict()
    expected_retrievals = neighbors.groupby("id").size().to_dict()
    classes = json.loads((out / "classes.json").read_text())["classes"]
    assert classes == ["ant", "bee"]
    for s in samples:
        meta = json.loads(s["json"])
        row = by_id.loc[meta["id"]]
        image_ext = [k for k in s if k not in ("__key__", "__url__", "__local_path__", "json", "cls")]
        assert image_ext == [{"jpeg": "jpg"}.get(row.key.rsplit(".", 1)[1], row.key.rsplit(".", 1)[1])]
        assert s[image_ext[0]] == _original_bytes(row.kind, row.source, row.key)
        assert len(meta["retrieved"]) == expected_retrievals[meta["id"]]
        best = neighbors[neighbors.id == meta["id"]].sort_values("similarity").iloc[-1]
        assert meta["label"] == seed_label[best.seed_id]
        assert int(s["cls"]) == classes.index(meta["label"])
        assert meta["label_from"] == {
            "from": "nearest seed",
            "seed_set": "insects",
            "seed_id": int(best.seed_id),
            "similarity": round(float(best.similarity), 6),
            "floor": 0.0,
        }


def test_no_label_without_a_floor_that_vouches_for_it(run):
    """Rows retrieved without a floor give no `.cls`; a floored retrieval of the same image does."""
    cfg, manifest, neighbors = run
    unfloored_seed = int(neighbors["seed_id"].iloc[0])
    neighbors.loc[neighbors["seed_id"] == unfloored_seed, "floor"] = np.nan
    neighbors.to_parquet(Path(cfg.run_dir) / "retrieve" / "neighbors.parquet", index=False)
    out = run_shards(cfg)
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("curated-*.tar")), shardshuffle=False))
    seed_label = manifest.set_index("id")["label"].to_dict()
    checked = 0
    for s in samples:
        meta = json.loads(s["json"])
        floored = neighbors[(neighbors.id == meta["id"]) & neighbors["floor"].notna()]
        if floored.empty:
            assert meta["label"] is None and "cls" not in s
            assert meta["label_from"] == {"from": None, "why": "retrieved without a similarity floor"}
            checked += 1
        else:
            assert meta["label"] == seed_label[floored.sort_values("similarity").iloc[-1].seed_id]
    assert checked > 0


def test_parquet_beside_each_tar_lists_its_samples_in_order(run):
    cfg, _, _ = run
    out = run_shards(cfg)
    for tar_path in sorted(out.glob("curated-*.tar")):
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
        keys = []
        for m in members:
            key = m.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
            assert m.mtime == 0 and m.uid == 0 and m.mode == 0o444
        index = pq.read_table(tar_path.with_suffix(".parquet")).to_pandas()
        assert index["__key__"].tolist() == keys
        assert len(keys) <= 7


def test_rerun_is_a_no_op_and_a_lost_shard_comes_back_identical(run, tmp_path):
    cfg, _, _ = run
    out = run_shards(cfg)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.iterdir())}
    run_shards(cfg)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.iterdir())} == before
    victim = sorted(out.glob("curated-*.tar"))[1]
    victim.unlink()
    run_shards(cfg)
    assert victim.read_bytes() == before[victim.name][1]


def test_two_runs_with_two_workers_give_identical_bytes(run, tmp_path):
    cfg, _, _ = run
    from omegaconf import OmegaConf

    first = run_shards(cfg)
    second_cfg = OmegaConf.merge(cfg, {"run_dir": str(tmp_path / "run2"), "workers": 2})
    (tmp_path / "run2").mkdir()
    for stage in ("manifest", "retrieve"):
        (tmp_path / "run2" / stage).symlink_to(Path(cfg.run_dir) / stage)
    second = run_shards(second_cfg)
    a = sorted(p.name for p in first.glob("curated-*"))
    assert a == sorted(p.name for p in second.glob("curated-*"))
    for name in a:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_resize_option_reencodes_as_jpeg(run):
    cfg, _, _ = run
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(cfg, {"shards": {"resize": 8}})
    out = run_shards(cfg)
    samples = list(
        wds.WebDataset(sorted(str(p) for p in out.glob("curated-*.tar")), shardshuffle=False, empty_check=False)
    )
    for s in samples:
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and min(img.size) == 8


def test_plan_respects_count_and_bytes():
    sizes = np.array([100, 100, 5000, 100, 100, 100])
    ranges = plan_shards(sizes, max_count=3, max_bytes=100 + 2048 + 100 + 2048 + 1)
    assert ranges == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert plan_shards(np.array([10**9]), 10, 10) == [(0, 1)]  # an oversized sample still gets a shard
    assert plan_shards(np.zeros(0), 10, 10) == []


def test_plan_equals_a_greedy_sample_by_sample_packing():
    def greedy(sizes, max_count, max_bytes):
        ranges, start, used = [], 0, 0
        for i, size in enumerate(sizes):
            cost = int(size) + 2048
            if i > start and (i - start >= max_count or used + cost > max_bytes):
                ranges.append((start, i))
                start, used = i, 0
            used += cost
        return ranges + ([(start, len(sizes))] if start < len(sizes) else [])

    rng = np.random.default_rng(0)
    for trial in range(50):
        sizes = rng.integers(0, 50_000, int(rng.integers(1, 400)))
        if trial % 5 == 0:
            sizes[rng.integers(0, len(sizes))] = 10**7  # an image larger than a whole shard
        max_count, max_bytes = int(rng.integers(1, 40)), int(rng.integers(1, 400_000))
        assert plan_shards(sizes, max_count, max_bytes) == greedy(sizes, max_count, max_bytes)


@pytest.mark.parametrize(
    "name,size,mtime", [("0000000000000000001.jpg", 123, 0), ("a.json", 0, 1_700_000_000), ("x" * 100, 8**11 - 1, 5)]
)
def test_ustar_header_is_byte_identical_to_tarfiles(name, size, mtime):
    from lvd.curate.shard_writer import ustar_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, mtime, 0o444, 0, 0, "", ""
    assert ustar_header(name, size, mtime) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_a_source_changed_since_the_manifest_stops_the_shard(run):
    cfg, manifest, neighbors = run
    victim = manifest.set_index("id").loc[int(neighbors["id"].iloc[0])]
    if victim.kind == "tar":
        victim = manifest[(manifest.kind == "folder") & manifest.id.isin(neighbors.id)].iloc[0]
    (Path(victim.source) / victim.key).write_bytes(_img(999, "PNG"))
    with pytest.raises(RuntimeError, match="changed since the manifest"):
        run_shards(cfg)
    assert not list(Path(cfg.run_dir, "shards").glob(".*tmp*"))


def test_a_failed_rerun_leaves_the_finished_shards_as_they_were(run, monkeypatch):
    import lvd.curate.shards as shards_module

    cfg, _, _ = run
    out = run_shards(cfg)
    files = lambda: {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}  # noqa: E731
    before = files()
    real, calls = shards_module.write_shard, []

    def fail_on_the_second(spec):
        calls.append(spec.path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(spec)

    monkeypatch.setattr(shards_module, "write_shard", fail_on_the_second)
    from omegaconf import OmegaConf

    smaller = OmegaConf.merge(cfg, {"shards": {"max_count": 3}})
    with pytest.raises(OSError, match="No space"):
        run_shards(smaller)
    assert files() == before and len(calls) == 2
    monkeypatch.setattr(shards_module, "write_shard", lambda spec: calls.append(spec.path) or real(spec))
    calls.clear()
    run_shards(smaller)  # resumes: the shard staged before the failure is not written again
    assert len(calls) == len(list(out.glob("curated-*.tar"))) - 1
