"""`lvd run`: the whole chain, killed with SIGKILL at several points and resumed, gives the
same shards byte for byte as an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_weights
from PIL import Image


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 256, (4, 24, 24, 3))

    def write(path, base):
        path.parent.mkdir(parents=True, exist_ok=True)
        noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(path)

    for i in range(48):
        write(root / "pool" / f"{i:03d}.png", protos[i % 4])
    for c in range(2):
        for j in range(3):
            write(root / "seeds" / f"class{c}" / f"{j}.png", protos[c])
    for j in range(4):
        write(root / "eval" / "e" / f"{j}.png", protos[3])
    save_tiny_weights("vit_tiny_p4", root / "tiny.pth")
    args = [
        f"sources.pool=[{root / 'pool'}]",
        f"sources.seeds.s={root / 'seeds'}",
        f"sources.eval.e={root / 'eval'}",
        "embed.model=vit_tiny_p4",
        f"embed.weights={root / 'tiny.pth'}",
        "embed.resolution=32",
        "embed.batch_size=8",
        "embed.dtype=float32",
        "embed.copy_detection.weights=null",
        "dedup.k=4",
        "dedup.threshold=0.98",
        "decontam.threshold=0.98",
        "cluster.k=4",
        "retrieve.n=3",
        "retrieve.min_similarity=null",  # this test is about kills and resumes, not the floor
        "shards.max_count=5",
        "workers=0",
        "progress=false",
    ]
    return root, args


def _start(run_dir, args):
    return subprocess.Popen(
        [sys.executable, "-m", "lvd.curate.cli", "run", "default", f"run_dir={run_dir}", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _shards(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "shards").glob("curated-*"))}


SEEDLESS = [
    "sources.seeds={}",
    "cluster.method=hierarchical",
    "cluster.level_ks=[8]",
    "cluster.k=4",
    "cluster.resample_steps=2",
]


@pytest.mark.slow
@pytest.mark.parametrize("seeds", ["seeded", "seedless"])
def test_killed_and_resumed_run_gives_identical_shards(setup, seeds):
    """Seedless: shards of the balanced sample (shards.select auto), resumable the same way."""
    root, args = setup
    if seeds == "seedless":
        root, args = root / "seedless", [*args, *SEEDLESS]
    ref = _start(root / "ref", args)
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()[-3000:]
    expected = _shards(root / "ref")
    assert expected and (root / "ref" / "report" / "index.html").is_file()
    success = json.loads((root / "ref" / "shards" / "_SUCCESS.json").read_text())
    assert success["select"] == ("balanced" if seeds == "seedless" else "retrieve") and success["samples"] > 0

    run_dir = root / "killed"
    kills = 0
    for marker in ("embed", "cluster", "shards"):
        proc = _start(run_dir, args)
        deadline = time.time() + 300
        while not (run_dir / marker).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2, "the kills must land while the run is going for this test to mean anything"
    final = _start(run_dir, args)
    assert final.wait(timeout=600) == 0, final.stderr.read().decode()[-3000:]
    assert _shards(run_dir) == expected


@pytest.mark.slow
def test_a_run_folder_moved_to_another_machine_is_still_up_to_date(setup, tmp_path):
    """Only where, when and how long a stage ran differs: nothing downstream is recomputed."""
    import json
    import shutil

    from lvd.curate import cli

    root, args = setup
    ref = _start(root / "moved-src", args)
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()[-3000:]
    moved = tmp_path / "elsewhere"
    shutil.copytree(root / "moved-src", moved)
    for success in moved.glob("*/_SUCCESS.json"):
        record = json.loads(success.read_text())
        record.update(
            host="another-host", finished_at="2030-01-01T00:00:00Z", seconds=123.0, versions={"python": "3.99"}
        )
        success.write_text(json.dumps(record))
    outputs = [
        p
        for stage in ("embed", "dedup", "cluster", "retrieve", "shards")
        for p in (moved / stage).rglob("*")
        if p.is_file() and p.name != "_SUCCESS.json"
    ]
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    assert cli.main(["run", "default", f"run_dir={moved}", *args, "--until", "shards"]) == 0
    assert {p: p.stat().st_mtime_ns for p in outputs} == stamps
