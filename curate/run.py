"""Every stage in order: `lvd run CONFIG` on one process, `torchrun ... -m lvd.curate.run CONFIG` on many.

Under torchrun (or a Slurm job that `lvd submit` started) the ranks join one process group for
the whole run. The stages that touch every image or vector split their work across the ranks
(manifest and embed by parts, dedup by lists, cluster by rows, retrieve by slices of the pool,
shards by shard) and rank 0 commits each one; the report, which reads a few rows of each stage,
runs on rank 0 while the others wait. Every stage resumes as `lvd run` does: a finished stage is
skipped, an interrupted one redoes only its unfinished parts, and the run folder ends byte for
byte as one process writes it (tests/test_run_pipeline.py, with two "nodes" of a c10d rendezvous).

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m lvd.curate.run CONFIG [key=value ...] [--until STAGE] [--overwrite]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from lvd.common.stages import STAGES

# The stages that run on every rank, each doing its share; the others run on rank 0 alone.
DISTRIBUTED = ("manifest", "detect", "embed", "dedup", "cluster", "retrieve", "shards")
# The settings that name the device of a stage's vector or model work.
DEVICE_KEYS = ("detect", "embed", "dedup", "cluster", "retrieve")

log = logging.getLogger("lvd")


def run_stage(name: str, cfg) -> Path:
    """`lvd.curate.<name>.run_<name>(cfg)`, imported when it runs (so `lvd --help` stays fast)."""
    func = getattr(importlib.import_module(f"lvd.curate.{name}"), f"run_{name}")
    log.info("stage %s", name)
    return func(cfg)


def group_device(cfg) -> str:
    """The device the run's process group is made for: NCCL when any stage works on a GPU, else gloo."""
    from lvd.common.devices import resolve_device

    devices = [resolve_device(str(cfg[key].device)) for key in DEVICE_KEYS]
    return "cuda" if any(d.type == "cuda" for d in devices) else "cpu"


def pipeline_stages(cfg, until: str | None = None) -> list[str]:
    """The stages a run goes through, in order: STAGES up to `until`, with the optional detect
    stage (Grounding DINO boxes for the embed stage's filters) before embed when its weights are set."""
    stages = list(STAGES[: STAGES.index(until) + 1] if until else STAGES)
    if cfg.detect.weights is not None and "embed" in stages:
        stages.insert(stages.index("embed"), "detect")
    return stages


def run_pipeline(cfg, until: str | None = None, echo: Callable[[str], None] = print) -> dict[str, Path]:
    """Run the stages up to `until` (all by default) in order, across the torchrun ranks when
    there are any; returns {stage: folder}. Rank 0 echoes each finished stage."""
    from lvd.common.ranks import torchrun_group  # torch: imported when a run starts, not for `lvd --help`

    stages = pipeline_stages(cfg, until)
    if "dedup" in stages:  # stop now, not after hours of embedding, when dedup would lack a threshold
        from lvd.curate.dedup_space import check_before_run

        check_before_run(cfg)
    done = {}
    with torchrun_group(group_device(cfg)) as ranks:
        for name in stages:
            if name in DISTRIBUTED or ranks.rank == 0:
                done[name] = Path(run_stage(name, cfg))
            ranks.barrier()  # a stage on rank 0 alone: the others wait for it
            if ranks.rank == 0:
                echo(f"{name}: {done[name]}")
    return done


def main(argv: list[str] | None = None) -> int:
    """`python -m lvd.curate.run CONFIG [key=value ...] [--until STAGE] [--overwrite]` on every rank."""
    from lvd.common.errors import run_command
    from lvd.common.logs import setup_logging
    from lvd.curate.config import load_config

    parser = argparse.ArgumentParser(prog="python -m lvd.curate.run", description=__doc__.split("\n")[0])
    parser.add_argument("config", metavar="CONFIG", help="YAML config file, or the name of a packaged one")
    parser.add_argument("overrides", metavar="KEY=VALUE", nargs="*", default=[], help="dotted overrides")
    parser.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
    parser.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    args = parser.parse_args(argv)

    def command() -> int:
        cfg = load_config(args.config, [*args.overrides, *(["overwrite=true"] if args.overwrite else [])])
        setup_logging(cfg.log_level)
        run_pipeline(cfg, args.until)
        return 0

    return run_command("python -m lvd.curate.run", command)


__all__ = ["STAGES", "DISTRIBUTED", "run_stage", "pipeline_stages", "run_pipeline", "group_device"]


if __name__ == "__main__":
    sys.exit(main())
