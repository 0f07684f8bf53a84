"""torch.distributed ranks as plain values: who am I, how many are we, my share of the rows.

A run without torchrun is a single `Ranks()` and never touches torch.distributed, so the vector
code that takes a `Ranks` (distributed k-means in `lvd.index`) runs the same in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


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
