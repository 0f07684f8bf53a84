"""Array views over stored vectors, and rows by id.

`EmbeddingRows` reads chosen rows of a list of `.npy` part files (the embed stage's
`part-NNNNN.npy`, listed by `lvd.common.run_folder.vector_files`) only when indexed, so vector
code takes it wherever it takes an array. `IdRows` answers "which row holds this id" for an
array of unique ids (an embedding folder's, an index's), the one id -> row lookup.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch


class IdRows:
    """Row of each id in an array of unique ids; the hash table is built once and reused."""

    def __init__(self, ids: np.ndarray, check_unique: bool = True):
        self.ids = np.asarray(ids, np.int64)
        self._index = pd.Index(self.ids)  # its hash table is built at the first lookup
        if check_unique and not self._index.is_unique:
            raise ValueError("ids repeat: a row by id would be ambiguous")

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, wanted) -> np.ndarray:
        """The row of each wanted id, -1 where the id is absent."""
        return self._index.get_indexer(np.asarray(wanted, np.int64))

    def row(self, id_: int) -> int:
        """The row of one id; KeyError when it is absent."""
        return int(self._index.get_loc(int(id_)))


#: rows of a held view gathered before their conversion to float32 (float16 at d = 384: 6 MB)
HELD_STAGE_ROWS = 8192


def _as_float32(out: np.ndarray, rows: np.ndarray) -> None:
    """out[:] = rows. float16 goes through torch's vectorised conversion: numpy's ran ~25x slower
    on a 2-core AVX2 machine (a join re-reads every row once per group of lists)."""
    if rows.dtype == np.float16:
        torch.from_numpy(out).copy_(torch.from_numpy(rows))
    else:
        out[...] = rows


class EmbeddingRows:
    """Chosen rows of a list of `.npy` parts (2-D, one after the other), read from the
    memory-mapped parts only when indexed.

    `view[idx]` (an index array or a slice) gives float32 rows; `len(view)` the row count;
    `np.asarray(view)` all of them; `view.blocks(rows)` yields them block by block. A torchrun
    rank reads its own slice and a k-means++ sample this way instead of the whole matrix.

    The parts are mapped for the duration of one read only: pages of a mapping count in the
    process's resident memory while it is mapped, so a view held open over a pass through a
    10M-row folder would otherwise end the pass holding the whole folder (float16 at d = 384:
    7.7 GB). Unmapped, they stay in the page cache for the next read. `held()` reads the rows
    into memory once instead, for passes that read them again and again.
    """

    _held: np.ndarray | None = None  # the rows as stored (float16 parts: float16), in view order

    def __init__(self, parts: Sequence[str | os.PathLike], rows: np.ndarray):
        self._paths = [Path(p) for p in parts]
        headers = [np.load(p, mmap_mode="r", allow_pickle=False) for p in self._paths]  # shape and dtype only
        shapes = [h.shape for h in headers]
        self._dtypes = {h.dtype for h in headers}
        del headers
        bad = [str(p) for p, shape in zip(self._paths, shapes) if len(shape) != 2]
        if bad:
            raise ValueError(f"vector parts that are not 2-D arrays: {bad}")
        sizes = np.array([s[0] for s in shapes], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self.rows = np.asarray(rows, np.int64)
        if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= self._starts[-1]):
            raise IndexError(f"rows outside the {int(self._starts[-1])} rows of {len(self._paths)} parts")
        dims = {s[1] for s in shapes}
        if len(dims) > 1:
            raise ValueError(f"vector parts of different dimensions: {sorted(dims)}")
        self.dim = dims.pop() if dims else 0
        #: bytes of one stored value (the widest part's): `held()` takes len(view) * dim * itemsize
        self.itemsize = max((d.itemsize for d in self._dtypes), default=4)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.dim

    def subset(self, index) -> EmbeddingRows:
        """A view of some of these rows (`index` into them); nothing is read."""
        view = copy.copy(self)
        view.rows = self.rows[index]
        view._held = None
        return view

    def held(self) -> EmbeddingRows:
        """This view with its rows read into memory once, as stored (float16 at d = 384: 768 bytes a
        row). For a pass that reads every row many times (the list join reads a group of lists'
        rows per group): a page of a mapped part is reclaimable, and on a machine whose kernel
        reclaims cold pages (DAMON) the join's reads of the mapped parts ran 5-9x slower than in
        a fresh process (1M rows, 2-core AMD EPYC); memory of the process is not reclaimed."""
        view = copy.copy(self)
        held = np.empty((len(self.rows), self.dim), next(iter(self._dtypes)) if len(self._dtypes) == 1 else np.float32)
        part = np.searchsorted(self._starts, self.rows, side="right") - 1
        for p in np.unique(part):
            hit = np.flatnonzero(part == p)
            vectors = np.load(self._paths[p], mmap_mode="r", allow_pickle=False)
            held[hit] = vectors[self.rows[hit] - self._starts[p]]
            del vectors
        view._held = held
        return view

    def __getitem__(self, index) -> np.ndarray:
        return self.read(index)

    def read(self, index, out: np.ndarray | None = None) -> np.ndarray:
        """float32 rows, `view[index]`, written into `out` when given ((rows, dim) float32): a pass
        that reads group after group reuses one buffer instead of faulting in fresh pages for each
        (in the list join at 1M rows, converting a group's rows into a fresh array ran ~10x
        slower than into a reused one, 2-core AMD EPYC)."""
        wanted = self.rows[index]
        out = np.empty((len(wanted), self.dim), np.float32) if out is None else out
        if self._held is not None:
            if isinstance(index, slice):
                _as_float32(out, self._held[index])
                return out
            index = np.asarray(index)
            staged = np.empty((min(len(index), HELD_STAGE_ROWS), self.dim), self._held.dtype)
            for start in range(0, len(index), HELD_STAGE_ROWS):  # gathered and converted a cached stage at a time
                stage = staged[: min(HELD_STAGE_ROWS, len(index) - start)]
                np.take(self._held, index[start : start + len(stage)], axis=0, out=stage)
                _as_float32(out[start : start + len(stage)], stage)
            return out
        part = np.searchsorted(self._starts, wanted, side="right") - 1
        for p in np.unique(part):
            hit = np.flatnonzero(part == p)
            vectors = np.load(self._paths[p], mmap_mode="r", allow_pickle=False)
            rows = vectors[wanted[hit] - self._starts[p]]
            del vectors  # unmapped: its pages leave this process's resident set
            if hit[-1] - hit[0] + 1 == len(hit):  # one run of rows (sorted rows of one part): converted in place
                _as_float32(out[hit[0] : hit[-1] + 1], rows)
            else:
                out[hit] = rows
        return out

    def blocks(self, rows_per_block: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 block) over all rows, `rows_per_block` at a time."""
        for start in range(0, len(self.rows), rows_per_block):
            yield start, self[slice(start, start + rows_per_block)]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[slice(None)]
        return whole if dtype is None else whole.astype(dtype, copy=False)
