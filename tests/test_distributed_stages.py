"""manifest and shards under torchrun (2 gloo ranks): the folder one process writes, byte for byte,
also when a rank is killed in the middle and the run resumed."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image
from torchrun_support import finish, folder_bytes, kill_rank, standalone, wait_for

from lvd.curate.config import load_config
from lvd.curate.manifest import read_manifest, run_manifest
from lvd.curate.shards import run_shards

pytestmark = pytest.mark.slow


def _image(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (18, 26, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _pool(tmp_path: Path) -> list[str]:
    """A tar shard and a folder of 12 images (one broken); returns the pool's sources."""
    folder = tmp_path / "pool"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not an image")
    for i in range(11):
        (folder / f"p{i:02d}.{'jpg' if i % 3 == 0 else 'png'}").write_bytes(_image(i, "JPEG" if i % 3 == 0 else "PNG"))
    with wds.TarWriter(str(tmp_path / "extra.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"t{i}", "webp": _image(100 + i, "WEBP")})
    return [str(tmp_path / "extra.tar"), str(folder)]


def _cfg(run_dir: Path, pool: list[str], *extra: str):
    pool_list = ",".join(f'"{p}"' for p in pool)
    overrides = [f"run_dir={run_dir}", f"sources.pool=[{pool_list}]", "workers=0", "progress=false", *extra]
    return load_config(None, [*overrides, "embed.copy_detection.weights=null"])


def _save(cfg, path: Path) -> Path:
    OmegaConf.save(cfg, path)
    return path


def _success(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "_SUCCESS.json").read_text())


def test_killed_rank_resumes_and_two_ranks_write_what_one_process_writes(tmp_path):
    """Tasks: the tar, then the folder in parts of 3; rank 1 gets parts 1, 3 and 5. Part 5 holds only
    a named pipe, whose read blocks until rank 1 is killed; the rerun decodes that part alone."""
    pool = _pool(tmp_path)
    fifo = Path(pool[1]) / "zz.png"
    os.mkfifo(fifo)
    two = tmp_path / "two"
    config = _save(_cfg(two, pool, "manifest.part_size=3"), tmp_path / "two.yaml")
    staged = two / "manifest" / ".staged"
    first = standalone("lvd.curate.manifest", config, "manifest-first", tmp_path)
    wait_for(lambda: len(list(staged.glob("_done-*.json"))) == 5, first)
    assert not (staged / "_done-00005.json").exists()
    kill_rank("manifest-first", 1, first)
    fifo.unlink()
    fifo.write_bytes(_image(99, "PNG"))
    stamps = {p.name: p.stat().st_mtime_ns for p in staged.glob("*")}

    code, out = finish(standalone("lvd.curate.manifest", config, "manifest-second", tmp_path))
    assert code == 0, out[-3000:]
    done = _success(two, "manifest")
    assert done["world_size"] == 2 and done["rows_decoded_this_run"] == 1 and done["parts"] == 6
    for name, stamp in stamps.items():  # the parts staged before the kill were moved, not redone
        assert (two / "manifest" / name).stat().st_mtime_ns == stamp

    one = tmp_path / "one"
    run_manifest(_cfg(one, pool, "manifest.part_size=3"))
    assert folder_bytes(two / "manifest") == folder_bytes(one / "manifest")
    reference = _success(one, "manifest")
    for key in ("fingerprint", "content", "rows", "counts", "parts"):
        assert done[key] == reference[key]
    frame = read_manifest(two, status=None)
    assert len(frame) == 17 and (frame.status == "quarantined").sum() == 1


def test_shards_of_a_killed_rank_resume_to_the_bytes_of_one_process(tmp_path):
    """Rank 1 writes the odd shards; one image of its last shard is replaced by a named pipe, so
    it stages its other shards and blocks there until it is killed."""
    pool = _pool(tmp_path)
    seeds = tmp_path / "seeds" / "ant"
    seeds.mkdir(parents=True)
    for j in range(2):
        (seeds / f"{j}.png").write_bytes(_image(200 + j, "PNG"))
    extra = (f"sources.seeds.insects={tmp_path / 'seeds'}", "shards.max_count=2")
    one, two = tmp_path / "one", tmp_path / "two"
    cfg_one = _cfg(one, pool, *extra)
    run_manifest(cfg_one)
    manifest = read_manifest(one)
    # Ids hash the sources' paths, so they change with tmp_path: each seed gets 5 distinct folder
    # images of its own (5 shards of 2 whatever the ids), and every shard has a file to replace.
    folder_rows = manifest[(manifest.set == "pool") & (manifest.source == pool[1])].sort_values("key")
    picks = np.random.default_rng(0).permutation(folder_rows["id"].to_numpy())[:10].reshape(2, 5)
    seed_ids = manifest[manifest.set == "seed:insects"].sort_values("key")["id"].to_numpy()
    neighbors = pd.DataFrame(
        [
            dict(seed_set="insects", seed_id=int(s), id=int(p), rank=r + 1, similarity=0.9 - r / 20, mode="sample")
            | dict(cluster=r % 2, floor=0.5)
            for s, chosen in zip(seed_ids, picks, strict=True)
            for r, p in enumerate(chosen)
        ]
    )
    (one / "retrieve").mkdir()
    neighbors.to_parquet(one / "retrieve" / "neighbors.parquet", index=False)
    run_shards(cfg_one)
    shard_count = len(list((one / "shards").glob("curated-*.tar")))
    assert shard_count >= 5

    last_odd = max(n for n in range(shard_count) if n % 2 == 1)
    rows = pd.read_parquet(one / "shards" / f"curated-{last_odd:06d}.parquet")
    key = rows[rows.source == pool[1]]["source_key"].iloc[-1]
    victim = Path(pool[1]) / key
    original = victim.read_bytes()
    for stage in ("manifest", "retrieve"):
        shutil.copytree(one / stage, two / stage)
    victim.unlink()
    os.mkfifo(victim)
    config = _save(_cfg(two, pool, *extra), tmp_path / "two.yaml")
    staged = two / "shards" / ".staged"
    first = standalone("lvd.curate.shards", config, "shards-first", tmp_path)
    wait_for(lambda: len(list(staged.glob("_done-*.json"))) == shard_count - 1, first)
    kill_rank("shards-first", 1, first)
    victim.unlink()
    victim.write_bytes(original)

    code, out = finish(standalone("lvd.curate.shards", config, "shards-second", tmp_path))
    assert code == 0, out[-3000:]
    assert folder_bytes(two / "shards") == folder_bytes(one / "shards")
    done, reference = _success(two, "shards"), _success(one, "shards")
    assert (
        done["world_size"] == 2
        and done["bytes_written"] == (two / "shards" / f"curated-{last_odd:06d}.tar").stat().st_size
    )
    for key in ("fingerprint", "content", "shards", "samples", "selected"):
        assert done[key] == reference[key]
