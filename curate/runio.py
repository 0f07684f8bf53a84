"""Run-directory I/O: atomic writes and stage completion markers.

A killed run must never leave a file that looks finished. Everything goes to a temporary
name in the same folder and is moved into place with `os.replace`, which is atomic on POSIX;
a stage's `_SUCCESS.json` is written last, so its presence means the stage finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import numpy as np

from lvd.common.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, remove_stale_temps  # noqa: F401 (the stages' import point)

SUCCESS_NAME = "_SUCCESS.json"


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("lvd", "numpy", "pandas", "pyarrow", "PIL", "torch", "faiss", "webdataset"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "unknown")
    try:
        from importlib.metadata import version

        versions["lvd"] = version("lvd")
    except Exception:
        pass
    return versions


def write_success(stage_dir: str | os.PathLike, **info) -> Path:
    """Mark a stage finished; `info` (inputs, counts, timings) is stored with versions and host."""
    record = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "versions": _versions(),
        **info,
    }
    return atomic_write_json(Path(stage_dir) / SUCCESS_NAME, record)


def read_success(stage_dir: str | os.PathLike) -> dict | None:
    path = Path(stage_dir) / SUCCESS_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def is_done(stage_dir: str | os.PathLike) -> bool:
    return (Path(stage_dir) / SUCCESS_NAME).is_file()


def clear_success(stage_dir: str | os.PathLike) -> None:
    """Forget that a stage finished (before redoing any of its work)."""
    path = Path(stage_dir) / SUCCESS_NAME
    if path.exists():
        path.unlink()


# ---------------------------------------------------------------- stage folders and fingerprints

FINGERPRINT_KEY = b"lvd.fingerprint"


def open_stage(cfg, name: str) -> Path:
    """RUN/<name>/, created, cleared of a killed run's temporary files; the config saved."""
    from lvd.curate.config import save_config

    out = Path(cfg.run_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    save_config(cfg, cfg.run_dir)
    return out


def fingerprint(*parts) -> str:
    """Stable hash of JSON-able settings and of numpy arrays (by content)."""
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


# _SUCCESS.json fields that describe the invocation, not the result: where and when it ran, how
# long, on how many ranks, with which library versions, how much of it was redone. A stage's
# output is the same whatever they say, so fingerprints of it leave them out, and a run folder
# moved to another machine is still up to date there.
VOLATILE_SUCCESS_KEYS = frozenset(
    {
        "finished_at",
        "host",
        "versions",
        "seconds",
        "world_size",
        "parts_written",
        "shards_written",
        "embedded_this_run_rank0",
        "thumbnails",
        "weights_sha1",
        "near_search",
    }
)


def stage_fingerprint(stage_dir: str | os.PathLike) -> str | None:
    """Content fingerprint of a finished stage, from its _SUCCESS.json without the volatile fields."""
    record = read_success(stage_dir)
    if record is None:
        return None
    return fingerprint({k: v for k, v in record.items() if k not in VOLATILE_SUCCESS_KEYS})


def parquet_fingerprint(path: str | os.PathLike) -> str | None:
    """The fingerprint stored in a parquet file's metadata; None if missing or unreadable."""
    import pyarrow.parquet as pq

    try:
        value = (pq.read_schema(path).metadata or {}).get(FINGERPRINT_KEY)
    except Exception:
        return None
    return value.decode() if value else None


def write_parquet(path: str | os.PathLike, table, fp: str | None = None) -> Path:
    """Write a pyarrow table atomically, with `fp` stored as its fingerprint."""
    import pyarrow.parquet as pq

    if fp is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), FINGERPRINT_KEY: fp.encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def write_frame(path: str | os.PathLike, frame, schema, fp: str | None = None) -> Path:
    """A pandas frame as parquet with an explicit schema (columns in the schema's order)."""
    import pyarrow as pa

    return write_parquet(path, pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False), fp)
