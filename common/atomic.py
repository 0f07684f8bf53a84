"""Files that are either complete or absent: write to a temporary name, then `os.replace`.

A killed run must never leave a file that looks finished. The temporary file (or folder) sits
beside its final name (so the rename is atomic on POSIX) under a hidden name that
`remove_stale_temps` finds. This is lvd's only maker of temporary names.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TEMP_MARK = ".tmp-"


def temp_path(path: str | os.PathLike) -> Path:
    """A hidden name beside `path`, unique to this process and moment, that `remove_stale_temps` removes."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{time.monotonic_ns()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Delete the temporary files and folders that a killed run left in `folder` (and below it,
    with `recursive`); returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = list(folder.rglob(f".*{TEMP_MARK}*") if recursive else folder.glob(f".*{TEMP_MARK}*"))
    for tmp in sorted(found, key=lambda p: len(p.parts)):
        _remove(tmp)
    return len(found)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (write a file or make a folder there); it is moved
    into place only if the block succeeds, and removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, sync: bool = True) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, default=str) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=default) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """`np.save` without pickles, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
    return Path(path)
