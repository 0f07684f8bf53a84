"""torchrun ranks for the stages: joining the group, one device per rank, gathering rows.

A stage run without torchrun (WORLD_SIZE unset or 1) gets a single-rank `Ranks` and never
touches torch.distributed.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from lvd.curate.config import load_config
from lvd.common.devices import resolve_device


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


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
    logging.basicConfig(level=getattr(logging, str(cfg.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(run_stage(cfg))
    return 0


def rank_slice(n: int, ranks: Ranks) -> slice:
    """This rank's contiguous share of n rows (the first n % world ranks get one more)."""
    base, extra = divmod(n, ranks.world)
    start = ranks.rank * base + min(ranks.rank, extra)
    return slice(start, start + base + (ranks.rank < extra))


def gather_rows(array: np.ndarray, ranks: Ranks) -> np.ndarray:
    """Every rank's rows concatenated in rank order, on every rank (shapes may differ in length)."""
    if ranks.world == 1:
        return array
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(ranks.world)]
    dist.all_gather(sizes, torch.tensor([len(local)], dtype=torch.int64, device=device))
    longest = int(max(int(n) for n in sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local
    slots = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(slots, padded)
    return np.concatenate([slot[: int(n)].cpu().numpy() for slot, n in zip(slots, sizes)])
