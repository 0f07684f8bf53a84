"""Every stage in order across ranks: `python -m lvd.curate.run` on two "nodes" joined by a c10d
rendezvous on localhost, and `lvd submit` through submitit's local executor, against one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_weights
from omegaconf import OmegaConf
from PIL import Image
from torchrun_support import finish, folder_bytes, free_port, torchrun_env

from lvd.curate.config import load_config
from lvd.curate.run import DISTRIBUTED, STAGES, pipeline_stages, run_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A pool of 14 small images (one exact duplicate), two seed classes and an eval set."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)

    def write(folder: Path, n: int) -> None:
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")

    write(root / "pool", 13)
    (root / "pool" / "copy.png").write_bytes((root / "pool" / "03.png").read_bytes())
    write(root / "seeds" / "ant", 2)
    write(root / "seeds" / "bee", 2)
    write(root / "eval", 2)
    save_tiny_weights("vit_tiny_p4", root / "tiny.pth")
    return {"root": root}


def pipeline_config(run_dir: Path, root: Path, *extra: str):
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f'sources.pool=["{root / "pool"}"]',
            f"sources.seeds.insects={root / 'seeds'}",
            f"sources.eval.held_out={root / 'eval'}",
            "workers=0",
            "progress=false",
            "manifest.part_size=4",
            "embed.model=vit_tiny_p4",
            f"embed.weights={root / 'tiny.pth'}",
            "embed.copy_detection.weights=null",
            "embed.part_size=4",
            "embed.batch_size=4",
            "embed.dtype=float32",
            "embed.threads=1",
            "dedup.k=4",
            "dedup.threshold=0.995",
            "decontam.threshold=0.995",
            "cluster.method=hierarchical",
            "cluster.level_ks=[4]",
            "cluster.k=2",
            "retrieve.n=3",
            "shards.max_count=3",
            *[f"{stage}.device=cpu" for stage in ("embed", "dedup", "cluster", "retrieve")],
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def one_process(sources, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    run_pipeline(pipeline_config(run_dir, sources["root"]))
    return run_dir


def assert_same_run(run: Path, reference: Path, world: int, cfg) -> None:
    """Every distributed stage that `cfg`'s run goes through wrote what one process wrote."""
    for stage in (s for s in pipeline_stages(cfg) if s in DISTRIBUTED):
        assert folder_bytes(run / stage), stage
        assert folder_bytes(run / stage) == folder_bytes(reference / stage), stage
        done = json.loads((run / stage / "_SUCCESS.json").read_text())
        expected = json.loads((reference / stage / "_SUCCESS.json").read_text())
        assert done["world_size"] == world and done["fingerprint"] == expected["fingerprint"], stage
    assert (run / "report" / "index.html").is_file()


def test_two_nodes_of_a_c10d_rendezvous_write_what_one_process_writes(sources, one_process, tmp_path):
    config = tmp_path / "two.yaml"
    OmegaConf.save(pipeline_config(tmp_path / "run", sources["root"]), config)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}"]
            + ["--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=lvd-test"]
            + ["-m", "lvd.curate.run", str(config)],
            cwd=tmp_path,
            env=torchrun_env(f"node{node}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for node in (0, 1)
    ]
    for node in nodes:
        code, out = finish(node)
        assert code == 0, out[-4000:]
    assert_same_run(tmp_path / "run", one_process, 2, pipeline_config(tmp_path / "run", sources["root"]))

    stamps = {s: (one_process / s / "_SUCCESS.json").stat().st_mtime_ns for s in STAGES}
    run_pipeline(pipeline_config(one_process, sources["root"]))  # a finished run: nothing is redone
    assert stamps == {s: (one_process / s / "_SUCCESS.json").stat().st_mtime_ns for s in STAGES}


def test_lvd_submit_runs_every_task_as_a_rank_through_submitits_local_executor(sources, one_process, tmp_path):
    """`lvd submit` without Slurm: submitit's local executor starts 2 tasks, each sets up
    torch.distributed from the job's variables and runs the pipeline as one rank of two."""
    from lvd.curate.cli import main

    config = tmp_path / "job.yaml"
    OmegaConf.save(pipeline_config(tmp_path / "run", sources["root"]), config)
    args = ["submit", str(config), "--cluster", "local", "--nodes", "1", "--gpus-per-node", "0"]
    args += ["--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10", "--wait"]
    assert main(args) == 0
    assert_same_run(tmp_path / "run", one_process, 2, pipeline_config(tmp_path / "run", sources["root"]))
    logs = list((tmp_path / "run" / "submitit").rglob("*_0_log.out"))
    assert logs, "submitit wrote no task logs"
