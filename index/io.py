"""Read the embedding parts that the embed stage writes.

The embed stage stores `part-NNNNN.npy` (float16, L2-normalised rows) next to
`ids-NNNNN.npy` (int64 manifest ids, row i of the part is id i of the ids). Readers must
never pair a part with the wrong ids file, so parts are matched by their number, not by
listing order, and every mismatch is an error rather than a silent truncation.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lvd.common.errors import InputFormatError, MissingInputError

_PART = re.compile(r"^part-(\d+)\.npy$")


def list_parts(folder: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(vectors, ids) file pairs of an embedding folder, in part-number order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"embedding folder not found: {folder}")
    pairs = []
    for path in sorted(folder.iterdir()):
        match = _PART.match(path.name)
        if match is None:
            continue
        ids_path = folder / f"ids-{match.group(1)}.npy"
        if not ids_path.exists():
            raise MissingInputError(f"{path} has no ids file {ids_path.name}")
        pairs.append((path, ids_path))
    orphans = {p.name for p in folder.glob("ids-*.npy")} - {i.name for _, i in pairs}
    if orphans:
        raise InputFormatError(f"ids files without a part in {folder}: {sorted(orphans)}")
    return pairs


def read_part(vectors_path: Path, ids_path: Path, *, dtype=np.float32, mmap: bool = False):
    """One part as (ids int64, vectors `dtype`), checked to have one id per row."""
    vectors = np.load(vectors_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    ids = np.load(ids_path, allow_pickle=False)
    if vectors.ndim != 2:
        raise InputFormatError(f"{vectors_path} is not a 2-D array (shape {vectors.shape})")
    if ids.shape != (len(vectors),):
        raise InputFormatError(f"{ids_path} holds {ids.shape} ids for {len(vectors)} rows of {vectors_path.name}")
    if dtype is not None and not mmap:
        vectors = vectors.astype(dtype, copy=False)
    return ids.astype(np.int64, copy=False), vectors


def iter_embeddings(folder: str | os.PathLike, *, dtype=np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (ids, vectors) part by part, so callers can stream folders larger than memory."""
    for vectors_path, ids_path in list_parts(folder):
        yield read_part(vectors_path, ids_path, dtype=dtype)


def load_embeddings(folder: str | os.PathLike, *, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """All parts of an embedding folder as (ids int64 [n], X `dtype` [n, d]).

    Rows keep part order; ids must be unique across parts (a repeated id would make the join
    with the manifest ambiguous). An empty folder gives (0,) ids and a (0, 0) array.
    """
    pairs = list_parts(folder)
    if not pairs:
        return np.zeros(0, np.int64), np.zeros((0, 0), dtype or np.float32)
    parts = [read_part(v, i, dtype=None, mmap=True) for v, i in pairs]
    dims = {p[1].shape[1] for p in parts}
    if len(dims) != 1:
        raise InputFormatError(f"parts of {folder} have different dimensions: {sorted(dims)}")
    ids = np.concatenate([p[0] for p in parts])
    out = np.empty((len(ids), dims.pop()), dtype=dtype or parts[0][1].dtype)
    row = 0
    for _, vectors in parts:
        out[row : row + len(vectors)] = vectors
        row += len(vectors)
    if len(np.unique(ids)) != len(ids):
        raise InputFormatError(f"{folder} holds repeated ids")
    return ids, out


class EmbeddingRows:
    """Chosen rows of an embedding folder, read from the memory-mapped parts only when indexed.

    `view[idx]` (an index array or a slice) gives float32 rows; `len(view)` the row count;
    `np.asarray(view)` all of them; `view.blocks(rows)` yields them block by block. A torchrun
    rank reads its own slice and a k-means++ sample this way instead of the whole matrix.

    The parts are mapped for the duration of one read only: pages of a mapping count in the
    process's resident memory while it is mapped, so a view held open over a pass through a
    10M-row folder would otherwise end the pass holding the whole folder (float16 at d = 384:
    7.7 GB). Unmapped, they stay in the page cache for the next read.
    """

    def __init__(self, folder: str | os.PathLike, rows: np.ndarray):
        pairs = list_parts(folder)
        self._paths = [v for v, _ in pairs]
        shapes = []
        for vectors_path, ids_path in pairs:
            ids, vectors = read_part(vectors_path, ids_path, dtype=None, mmap=True)
            shapes.append(vectors.shape)
            del vectors
        sizes = np.array([s[0] for s in shapes], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self.rows = np.asarray(rows, np.int64)
        if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= self._starts[-1]):
            raise IndexError(f"rows outside the {int(self._starts[-1])} rows of {folder}")
        dims = {s[1] for s in shapes}
        if len(dims) > 1:
            raise InputFormatError(f"parts of {folder} have different dimensions: {sorted(dims)}")
        self.dim = dims.pop() if dims else 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.dim

    def subset(self, index) -> EmbeddingRows:
        """A view of some of these rows (`index` into them); nothing is read."""
        view = copy.copy(self)
        view.rows = self.rows[index]
        return view

    def __getitem__(self, index) -> np.ndarray:
        wanted = self.rows[index]
        out = np.empty((len(wanted), self.dim), np.float32)
        part = np.searchsorted(self._starts, wanted, side="right") - 1
        for p in np.unique(part):
            hit = np.flatnonzero(part == p)
            vectors = np.load(self._paths[p], mmap_mode="r", allow_pickle=False)
            out[hit] = vectors[wanted[hit] - self._starts[p]]
            del vectors  # unmapped: its pages leave this process's resident set
        return out

    def blocks(self, rows_per_block: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 block) over all rows, `rows_per_block` at a time."""
        for start in range(0, len(self.rows), rows_per_block):
            yield start, self[slice(start, start + rows_per_block)]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[slice(None)]
        return whole if dtype is None else whole.astype(dtype, copy=False)


def load_embedding_ids(folder: str | os.PathLike) -> np.ndarray:
    """The ids of every row of an embedding folder, in part order, without reading the vectors."""
    pairs = list_parts(folder)
    if not pairs:
        return np.zeros(0, np.int64)
    return np.concatenate([np.load(i, allow_pickle=False).astype(np.int64, copy=False) for _, i in pairs])
