"""The manifest stage: every input accounted for, idempotent reruns, kill-and-resume."""

import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image
from zoo import noise_image, rgb_jpeg, write_zoo

from lvd.curate.config import load_config
from lvd.curate.manifest import read_manifest, run_manifest, stable_id


def _cfg(run_dir, pool=(), seeds=None, evals=None, *extra):
    overrides = [
        f"run_dir={run_dir}",
        "sources.pool=[" + ",".join(f'"{p}"' for p in pool) + "]",
        "progress=false",
        "workers=0",
    ]
    for name, path in (seeds or {}).items():
        overrides.append(f"sources.seeds.{name}={path}")
    for name, path in (evals or {}).items():
        overrides.append(f"sources.eval.{name}={path}")
    return load_config(None, overrides + list(extra))


def _png(color, size=(8, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def test_zoo_folder_every_input_accounted_for(tmp_path):
    cases = write_zoo(tmp_path / "zoo")
    # small parts so that two worker processes really share the work
    run_manifest(_cfg(tmp_path / "run", [tmp_path / "zoo"], None, None, "workers=2", "manifest.part_size=4"))
    frame = read_manifest(tmp_path / "run", status=None)
    # exactly the image-named, non-hidden files, each once
    assert sorted(frame["key"]) == sorted(c.name for c in cases)
    assert frame["id"].is_unique
    by_key = frame.set_index("key")
    for case in cases:
        row = by_key.loc[case.name]
        assert row["sha1"] == hashlib.sha1(case.data).hexdigest(), case.name
        assert row["bytes"] == len(case.data)
        if case.ok:
            assert row["status"] == "ok", (case.name, row["error"])
            assert (row["width"], row["height"]) == case.size, case.name
        else:
            assert row["status"] == "quarantined", case.name
            assert case.error_has in row["error"], (case.name, row["error"])
    assert by_key.loc["animated.gif", "frames"] == 3
    assert by_key.loc["cmyk.jpg", "mode"] == "CMYK"
    # the folder is a parquet dataset as plain pandas and pyarrow read it: markers are not parts
    plain = pd.read_parquet(tmp_path / "run" / "manifest")
    assert sorted(plain["id"]) == sorted(frame["id"])


def test_pixel_limit_from_config_quarantines_large_images(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "small.png").write_bytes(_png((1, 2, 3), (10, 10)))
    (tmp_path / "p" / "large.png").write_bytes(_png((1, 2, 3), (40, 30)))
    run_manifest(_cfg(tmp_path / "run", [tmp_path / "p"], None, None, "decode.max_pixels=1000"))
    frame = read_manifest(tmp_path / "run", status=None).set_index("key")
    assert frame.loc["small.png", "status"] == "ok"
    assert frame.loc["large.png", "status"] == "quarantined"
    assert "decompression bomb" in frame.loc["large.png", "error"]


def _write_tar(path, samples):
    """samples: list of (key, {ext: bytes}) written with the upstream webdataset writer."""
    with wds.TarWriter(str(path)) as sink:
        for key, members in samples:
            sink.write({"__key__": key, **members})


def test_tar_shards_with_a_corrupt_member_and_labels(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_tar(
        shards / "pool-000000.tar",
        [
            ("a", {"jpg": rgb_jpeg()}),
            ("b", {"jpg": b"\xff\xd8\xff garbage"}),
            ("c", {"png": _png((0, 0, 0)), "cls": b"7"}),
        ],
    )
    _write_tar(shards / "pool-000001.tar", [("d", {"webp": _webp()}), ("e", {"json": b"{}"})])
    run_manifest(_cfg(tmp_path / "run", [str(shards / "pool-{000000..000001}.tar")]))
    frame = read_manifest(tmp_path / "run", status=None)
    rows = {(Path(r.source).name, r.key): r for r in frame.itertuples()}
    assert set(rows) == {
        ("pool-000000.tar", "a.jpg"),
        ("pool-000000.tar", "b.jpg"),
        ("pool-000000.tar", "c.png"),
        ("pool-000001.tar", "d.webp"),
        ("pool-000001.tar", "e"),
    }
    assert rows[("pool-000000.tar", "a.jpg")].status == "ok"
    assert rows[("pool-000000.tar", "b.jpg")].status == "quarantined"
    assert rows[("pool-000000.tar", "c.png")].label == "7"
    assert "no image member" in rows[("pool-000001.tar", "e")].error
    assert (frame["kind"] == "tar").all()


def _webp():
    buf = io.BytesIO()
    noise_image(16, 16).save(buf, "WEBP")
    return buf.getvalue()


def _member_offsets(tar_path):
    with tarfile.open(tar_path) as tar:
        return [(m.offset, m.offset_data, m.size) for m in tar.getmembers()]


@pytest.mark.parametrize("where", ["inside_member_data", "between_members"])
def test_truncated_tar_keeps_what_it_read_and_records_the_error(tmp_path, where):
    tar_path = tmp_path / "t.tar"
    _write_tar(tar_path, [(f"s{i}", {"jpg": rgb_jpeg(64, 64, (i, i, i))}) for i in range(6)])
    offsets = _member_offsets(tar_path)
    cut = offsets[3][1] + 100 if where == "inside_member_data" else offsets[3][0]
    tar_path.write_bytes(tar_path.read_bytes()[:cut])
    run_manifest(_cfg(tmp_path / "run", [tar_path]))
    frame = read_manifest(tmp_path / "run", status=None)
    assert sorted(frame[frame.status == "ok"].key) == ["s0.jpg", "s1.jpg", "s2.jpg"]
    errors = frame[frame.key.str.startswith("#tar-error")]
    assert len(errors) == 1 and errors.iloc[0]["status"] == "quarantined"


def test_path_lists_and_seed_class_folders(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(_png((i, 0, 0)))
    pd.DataFrame(
        {"path": ["imgs/0.png", str(images / "1.png"), "imgs/2.png", "imgs/0.png", "imgs/missing.png"]}
    ).to_csv(tmp_path / "list.csv", index=False)
    pd.DataFrame({"path": ["imgs/1.png"], "label": ["one"]}).to_parquet(tmp_path / "list.parquet")
    seeds = tmp_path / "seeds"
    for cls in ("cat", "dog"):
        (seeds / cls).mkdir(parents=True)
        (seeds / cls / "x.png").write_bytes(_png((9, 9, 9)))
    run_manifest(
        _cfg(tmp_path / "run", [tmp_path / "list.csv"], {"animals": seeds}, {"held": tmp_path / "list.parquet"})
    )
    frame = read_manifest(tmp_path / "run", status=None)
    pool = frame[frame.set == "pool"]
    assert sorted(pool.key) == sorted(
        ["imgs/0.png", str(images / "1.png"), "imgs/2.png", "imgs/missing.png"]
    )  # repeat kept once
    assert pool.set_index("key").loc["imgs/missing.png", "status"] == "quarantined"
    seed = frame[frame.set == "seed:animals"].set_index("key")
    assert seed.loc["cat/x.png", "label"] == "cat" and seed.loc["dog/x.png", "label"] == "dog"
    held = frame[frame.set == "eval:held"]
    assert held.iloc[0]["label"] == "one" and held.iloc[0]["status"] == "ok"


def test_ids_are_stable_hashes_of_the_input(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.png").write_bytes(_png((1, 1, 1)))
    run_manifest(_cfg(tmp_path / "run", [tmp_path / "p"]))
    first = read_manifest(tmp_path / "run")
    (tmp_path / "p" / "0_new.png").write_bytes(_png((2, 2, 2)))  # sorts before a.png
    run_manifest(_cfg(tmp_path / "run", [tmp_path / "p"]))
    second = read_manifest(tmp_path / "run").set_index("key")
    assert second.loc["a.png", "id"] == first.set_index("key").loc["a.png", "id"]
    digest = hashlib.blake2b(f"pool\0{tmp_path / 'p'}\0a.png".encode(), digest_size=8).digest()
    assert stable_id("pool", str(tmp_path / "p"), "a.png") == int.from_bytes(digest, "big") & (2**63 - 1)


def test_rerun_with_nothing_new_does_no_work(tmp_path):
    write_zoo(tmp_path / "zoo")
    cfg = _cfg(tmp_path / "run", [tmp_path / "zoo"], None, None, "manifest.part_size=5")
    run_manifest(cfg)
    out = tmp_path / "run" / "manifest"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert len([n for n in before if n.startswith("part-")]) == 5
    run_manifest(cfg)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert after == before
    # a touched file redoes only its own part
    os.utime(tmp_path / "zoo" / "plain.jpg", ns=(1, 1))
    run_manifest(cfg)
    changed = [n for n in before if n.startswith("part-") and (out / n).stat().st_mtime_ns != before[n][0]]
    assert len(changed) == 1


def _make_pool(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"d{i % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(arr).save(sub / f"{i:05d}.jpg", quality=90)
    (root / "d0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")


def _lvd(args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "lvd.curate.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw
    )


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    pool = tmp_path / "pool"
    _make_pool(pool, 1200)
    common = [f"sources.pool=[{pool}]", "manifest.part_size=40", "workers=0", "progress=false"]
    ref = _lvd(["manifest", "default", f"run_dir={tmp_path / 'ref'}", *common])
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()

    killed_dir = tmp_path / "killed"
    proc = _lvd(["manifest", "default", f"run_dir={killed_dir}", *common])
    deadline = time.time() + 120
    staged = killed_dir / "manifest" / ".staged"  # new parts wait there until the run commits them all
    while len(list(staged.glob("part-*.parquet"))) < 4 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before_kill = len(list(staged.glob("part-*.parquet")))
    assert 4 <= done_before_kill < 31, "the kill must land mid-way for this test to mean anything"
    assert not (killed_dir / "manifest" / "_SUCCESS.json").exists()
    assert not list((killed_dir / "manifest").glob("part-*.parquet"))  # nothing committed

    resumed = _lvd(["manifest", "default", f"run_dir={killed_dir}", *common])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    ref_parts = sorted((tmp_path / "ref" / "manifest").glob("part-*.parquet"))
    new_parts = sorted((killed_dir / "manifest").glob("part-*.parquet"))
    assert [p.name for p in ref_parts] == [p.name for p in new_parts] and len(ref_parts) == 31
    for a, b in zip(ref_parts, new_parts):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert not list((killed_dir / "manifest").glob(".*tmp*"))
    frame = read_manifest(killed_dir, status=None)
    assert len(frame) == 1201 and (frame.status == "quarantined").sum() == 1


def test_link_members_of_a_tar_are_quarantined_rows(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), (9, 9, 9)).save(buf, "PNG")
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("s0.png")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
        link = tarfile.TarInfo("s1.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    cfg = _cfg(tmp_path / "run", [str(path)])
    run_manifest(cfg)
    rows = read_manifest(cfg.run_dir, status=None).set_index("key")
    assert rows.at["s0.png", "status"] == "ok"
    assert rows.at["s1.png", "status"] == "quarantined" and "link member" in rows.at["s1.png", "error"]
    assert "/etc/passwd" in rows.at["s1.png", "error"]
