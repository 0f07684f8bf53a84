"""torchrun ranks for the stages: joining the group, one device per rank, gathering rows.

A stage run without torchrun (WORLD_SIZE unset or 1) gets a single-rank `Ranks` and never
touches torch.distributed.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from lvd.common.devices import resolve_device
from lvd.common.logs import setup_logging
from lvd.common.ranks import Ranks, gather_rows, rank_slice  # noqa: F401 (the stages' import point)
from lvd.curate.config import load_config


def join_ranks(device_pref) -> Ranks:
    """Join the torchrun process group when there is one (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    owns = False
    if not dist.is_initialized():
        use_cuda = resolve_device(device_pref).type == "cuda"
        if use_cuda:  # one GPU per rank on each host; NCCL needs it chosen before the group forms
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # long parts: ranks may wait on each other far longer than the default 30 minutes
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=12))
        owns = True
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def in_ranks(stage, cfg, device_pref):
    """`stage(cfg, ranks)` inside the torchrun group when there is one (joined here, and left
    when the stage returns or fails), else in one process."""
    ranks = join_ranks(device_pref)
    try:
        return stage(cfg, ranks)
    finally:
        if ranks.owns_group:
            dist.destroy_process_group()


def rank_device(device_pref, ranks: Ranks) -> torch.device:
    device = resolve_device(device_pref)
    if device.type == "cuda" and device.index is None and ranks.world > 1:
        return torch.device("cuda", ranks.local_rank)
    return device


def torchrun_main(run_stage, module: str, argv: list[str] | None = None) -> int:
    """`python -m <module> CONFIG [key=value ...]`: a stage as torchrun starts it on every rank."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(f"usage: python -m {module} CONFIG [key=value ...]", file=sys.stderr)
        return 2
    cfg = load_config(args[0], args[1:])
    setup_logging(cfg.log_level)
    print(run_stage(cfg))
    return 0
