"""Small torch.distributed helpers that degrade to no-ops in a single process.

Every collective used by the losses goes through here, so one code path serves 1 rank and
N ranks (the 2-rank gloo test compares them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lvd.common.ranks import join_group


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (identity on one rank); returns `t`."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Maximum of `t` over ranks in place (identity on one rank); returns `t`."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes in the environment; False when not launched so.

    gloo on CPU, nccl on CUDA (`lvd.common.ranks.join_group`, as the curation stages join it).
    Safe to call twice (a test may have initialised the group).
    """
    return join_group(device).world > 1 or is_distributed()
