"""torch.distributed ranks as plain values: who am I, how many are we, my share of the rows.

A run without torchrun is a single `Ranks()` and never touches torch.distributed, so the vector
code that takes a `Ranks` (distributed k-means in `lvd.index`) runs the same in one process.
`join_group` is lvd's one way into the group torchrun describes (the stages and the trainer).
A task of a Slurm job (`lvd submit`, through submitit) describes itself in Slurm's variables
instead; `export_job_environment` writes torchrun's variables from them, so the same
`join_group` joins there too.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from lvd.common.devices import resolve_device

# Ranks may wait on each other for a long part (a slow shard, a large list) far past torch's
# default 30 minutes.
GROUP_TIMEOUT = timedelta(hours=12)


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def join_group(device="cpu") -> Ranks:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), else a
    single `Ranks()`. gloo on CPU; NCCL on CUDA, with this rank's GPU chosen first. A group that
    already exists (a test, the trainer) is used as it is and not owned."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), local, False)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    use_cuda = resolve_device(device).type == "cuda"
    if use_cuda:  # NCCL needs the rank's GPU chosen before the group forms
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=GROUP_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), local, True)


def leave_group(ranks: Ranks) -> None:
    """Destroy the group if `join_group` made it."""
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def torchrun_group(device="cpu") -> Iterator[Ranks]:
    """`join_group` for the length of a block, left however the block ends."""
    ranks = join_group(device)
    try:
        yield ranks
    finally:
        leave_group(ranks)


# The variables torchrun sets for each rank, which torch.distributed's env:// initialisation reads.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch_variables(
    *, rank: int, world: int, local_rank: int, nodes: int, master_addr: str, job_id: str
) -> dict[str, str]:
    """torchrun's variables for one task of a job of `world` tasks on `nodes` nodes (as many per
    node). The rendezvous is the job's first node at a port drawn from the job id, so that every
    task of the job names the same one and two jobs on one node rarely collide."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(max(1, world // max(1, nodes))),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(random.Random(job_id).randint(20000, 59999)),
    }


def job_variables() -> dict[str, str]:
    """torchrun's variables for this task of a submitit job, from its scheduler's own (Slurm's
    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NUM_NODES, SLURM_JOB_NODELIST and
    SLURM_JOB_ID, whose node list submitit expands; or the local executor's equivalents)."""
    import submitit

    job = submitit.JobEnvironment()
    return launch_variables(
        rank=job.global_rank,
        world=job.num_tasks,
        local_rank=job.local_rank,
        nodes=job.num_nodes,
        master_addr=job.hostnames[0],
        job_id=str(job.job_id),
    )


def export_job_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Write `job_variables` into the environment (a MASTER_PORT already there is kept) so that
    `join_group` joins the job's group; returns what was written."""
    environ = os.environ if environ is None else environ
    variables = job_variables()
    if "MASTER_PORT" in environ:
        variables["MASTER_PORT"] = environ["MASTER_PORT"]
    environ.update(variables)
    return variables


def rank_device(device, ranks: Ranks) -> torch.device:
    """The device of this rank: a bare `cuda` (or auto on a GPU host) under torchrun is its local GPU."""
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None and ranks.world > 1:
        return torch.device("cuda", ranks.local_rank)
    return device


def rank_slice(n: int, ranks: Ranks) -> slice:
    """This rank's contiguous share of n rows (the first n % world ranks get one more)."""
    base, extra = divmod(n, ranks.world)
    start = ranks.rank * base + min(ranks.rank, extra)
    return slice(start, start + base + (ranks.rank < extra))


def gather_rows(array: np.ndarray, ranks: Ranks) -> np.ndarray:
    """Every rank's rows concatenated in rank order, on every rank (shapes may differ in length).

    The rows travel as bytes, so any numeric dtype goes through (gloo has no int16, which the
    list join's probes use)."""
    if ranks.world == 1:
        return array
    array = np.ascontiguousarray(array)
    row_shape, dtype = array.shape[1:], array.dtype
    raw = array.reshape(len(array), int(np.prod(row_shape, dtype=np.int64))).view(np.uint8)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = torch.from_numpy(raw).to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(ranks.world)]
    dist.all_gather(sizes, torch.tensor([len(local)], dtype=torch.int64, device=device))
    longest = int(max(int(n) for n in sizes))
    padded = torch.zeros((longest, raw.shape[1]), dtype=local.dtype, device=device)
    padded[: len(local)] = local
    slots = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(slots, padded)
    rows = np.concatenate([slot[: int(n)].cpu().numpy() for slot, n in zip(slots, sizes)])
    return rows.view(dtype).reshape(len(rows), *row_shape)


def broadcast_array(array: np.ndarray | None, ranks: Ranks, src: int = 0) -> np.ndarray:
    """Rank `src`'s array (any shape, a numeric dtype) on every rank; the others pass None."""
    if ranks.world == 1:
        return array
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    codes = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.int32): 2, np.dtype(np.int64): 3}
    header = torch.zeros(9, dtype=torch.int64, device=device)
    if ranks.rank == src:
        array = np.ascontiguousarray(array)
        if array.dtype not in codes or array.ndim > 7:
            raise TypeError(f"cannot broadcast a {array.dtype} array of {array.ndim} dimensions")
        header[0], header[1] = codes[array.dtype], array.ndim
        header[2 : 2 + array.ndim] = torch.tensor(array.shape, dtype=torch.int64)
    dist.broadcast(header, src)
    dtype = {v: k for k, v in codes.items()}[int(header[0])]
    shape = tuple(int(s) for s in header[2 : 2 + int(header[1])])
    data = (
        torch.from_numpy(array).to(device)
        if ranks.rank == src
        else torch.empty(shape, dtype=getattr(torch, dtype.name), device=device)
    )
    dist.broadcast(data, src)
    return data.cpu().numpy()
