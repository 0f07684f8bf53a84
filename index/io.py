"""Read the embedding parts that the embed stage writes.

The embed stage stores `part-NNNNN.npy` (float16, L2-normalised rows) next to
`ids-NNNNN.npy` (int64 manifest ids, row i of the part is id i of the ids). Readers must
never pair a part with the wrong ids file, so parts are matched by their number, not by
listing order, and every mismatch is an error rather than a silent truncation.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

_PART = re.compile(r"^part-(\d+)\.npy$")


def list_parts(folder: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(vectors, ids) file pairs of an embedding folder, in part-number order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no embedding folder at {folder}")
    pairs = []
    for path in sorted(folder.iterdir()):
        match = _PART.match(path.name)
        if match is None:
            continue
        ids_path = folder / f"ids-{match.group(1)}.npy"
        if not ids_path.exists():
            raise FileNotFoundError(f"{path} has no ids file {ids_path.name}")
        pairs.append((path, ids_path))
    orphans = {p.name for p in folder.glob("ids-*.npy")} - {i.name for _, i in pairs}
    if orphans:
        raise FileNotFoundError(f"ids files without a part in {folder}: {sorted(orphans)}")
    return pairs


def read_part(vectors_path: Path, ids_path: Path, *, dtype=np.float32, mmap: bool = False):
    """One part as (ids int64, vectors `dtype`), checked to have one id per row."""
    vectors = np.load(vectors_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    ids = np.load(ids_path, allow_pickle=False)
    if vectors.ndim != 2:
        raise ValueError(f"{vectors_path} is not a 2-D array (shape {vectors.shape})")
    if ids.shape != (len(vectors),):
        raise ValueError(f"{ids_path} holds {ids.shape} ids for {len(vectors)} rows of {vectors_path.name}")
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
        raise ValueError(f"parts of {folder} have different dimensions: {sorted(dims)}")
    ids = np.concatenate([p[0] for p in parts])
    out = np.empty((len(ids), dims.pop()), dtype=dtype or parts[0][1].dtype)
    row = 0
    for _, vectors in parts:
        out[row : row + len(vectors)] = vectors
        row += len(vectors)
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{folder} holds repeated ids")
    return ids, out
