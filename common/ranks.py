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
