"""The manifest stage: one row per input image, decoded once to prove it is usable.

reader  : the configured sources are listed into tasks, one manifest part each (a chunk of a
          folder or path list, or one tar shard);
mapper  : worker processes read each file, hash its bytes and decode it (JPEGs at reduced
          DCT scale: enough to prove the data is whole, far cheaper than full size), in
          `curate.manifest_rows`;
writer  : the parent writes each part atomically as soon as all of its rows are in.

A part records a fingerprint of its task (inputs, file sizes and times, decoding limits);
a rerun skips every part whose fingerprint still matches, so nothing new means no work, and a
killed run resumes where it stopped and ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from lvd.common.errors import MissingInputError
from lvd.curate import sources as src
from lvd.curate.config import as_list, named_sources
from lvd.curate.manifest_rows import OK, QUARANTINED, DecodeSettings, process_unit, stable_id
from lvd.curate.runio import is_done, open_stage, parquet_fingerprint, remove_stale_temps, write_parquet, write_success
from lvd.curate.stage import STAGED, commit_staged_parts
from lvd.curate.workers import process_map, resolve_workers, show_progress

log = logging.getLogger(__name__)

STAGE = "manifest"
# Files per work unit handed to a worker: small enough to balance, large enough to amortise.
UNIT_SIZE = 32

SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("set", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("key", pa.string()),
        ("label", pa.string()),
        ("bytes", pa.int64()),
        ("sha1", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("frames", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)


@dataclass
class Task:
    """The inputs of one manifest part."""

    index: int
    set: str
    kind: str
    source: str
    keys: list[str] = field(default_factory=list)  # folder and list tasks; tars are discovered
    labels: list[str | None] = field(default_factory=list)
    fingerprint: str = ""

    @property
    def part_name(self) -> str:
        return f"part-{self.index:05d}.parquet"


# ---------------------------------------------------------------- reader: sources -> tasks


def _set_sources(cfg) -> list[tuple[str, list[str], bool]]:
    """(set name, [source spec...], labels from class folders?) for pool, seeds and eval sets."""
    sets = [("pool", [str(s) for s in as_list(cfg.sources.pool)], False)]
    sets += [(f"seed:{name}", specs, True) for name, specs in named_sources(cfg.sources.seeds)]
    sets += [(f"eval:{name}", specs, True) for name, specs in named_sources(cfg.sources.eval)]
    return sets


def _local_identity(spec: str) -> str:
    return spec if "://" in spec or spec.startswith("pipe:") else os.path.abspath(spec)


def _stat_signature(paths: Iterable[str]) -> str:
    h = hashlib.sha1()
    for path in paths:
        try:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()


def _fingerprint(task: Task, settings: DecodeSettings, stat_sig: str) -> str:
    h = hashlib.sha1()
    h.update(
        repr((task.set, task.kind, task.source, settings.max_pixels, settings.max_bytes, settings.extensions)).encode()
    )
    for key, label in zip(task.keys, task.labels):
        h.update(f"{key}\0{label}\n".encode())
    h.update(stat_sig.encode())
    return h.hexdigest()


def plan_tasks(cfg, settings: DecodeSettings, part_size: int) -> list[Task]:
    """List every source into tasks, in a fixed order: pool, then seeds and evals by name."""
    tasks: list[Task] = []
    follow = bool(cfg.manifest.follow_symlinks)
    for set_name, specs, class_labels in _set_sources(cfg):
        seen_sources: set[str] = set()
        for spec in specs:
            kind = src.classify(spec)
            if kind == src.TAR:
                for url in src.expand_shards(spec):
                    url = _local_identity(url)
                    if url in seen_sources:
                        continue
                    seen_sources.add(url)
                    task = Task(len(tasks), set_name, src.TAR, url)
                    sig = _stat_signature([url]) if os.path.exists(url) else url
                    task.fingerprint = _fingerprint(task, settings, sig)
                    tasks.append(task)
                continue
            source = _local_identity(spec)
            if source in seen_sources:
                continue
            seen_sources.add(source)
            if kind == src.FOLDER:
                keys = src.list_folder(source, settings.extensions, follow_symlinks=follow)
                layout = class_labels and src.has_class_layout(source)
                labels = [src.class_label(k, layout) for k in keys]
                paths = [os.path.join(source, k) for k in keys]
            else:
                keys, labels = _listed_keys(source)
                paths = [src.resolve_listed_path(source, k) for k in keys]
            for start in range(0, len(keys), part_size):
                task = Task(
                    len(tasks),
                    set_name,
                    kind,
                    source,
                    keys[start : start + part_size],
                    labels[start : start + part_size],
                )
                task.fingerprint = _fingerprint(task, settings, _stat_signature(paths[start : start + part_size]))
                tasks.append(task)
    return tasks


def _listed_keys(list_file: str) -> tuple[list[str], list[str | None]]:
    frame = pd.read_parquet(list_file) if list_file.lower().endswith(".parquet") else pd.read_csv(list_file)
    if "path" not in frame.columns:
        raise src.SourceError(f"{list_file}: a path list needs a column named 'path' (has {list(frame.columns)})")
    labels = frame["label"].astype("string") if "label" in frame.columns else pd.Series([None] * len(frame))
    keys, out_labels, seen = [], [], set()
    for path, label in zip(frame["path"].astype(str), labels):
        if path in seen:  # the same file listed twice is one input
            log.warning("%s lists %s more than once; it is kept once", list_file, path)
            continue
        seen.add(path)
        keys.append(path)
        out_labels.append(None if pd.isna(label) else str(label))
    return keys, out_labels


# ---------------------------------------------------------------- writer: rows -> parts


def write_part(path: Path, rows: list[dict], fingerprint: str) -> None:
    table = pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names} for row in rows], schema=SCHEMA)
    write_parquet(path, table, fingerprint)


def _units(tasks: list[Task], settings: DecodeSettings) -> Iterator[tuple]:
    for task in tasks:
        if task.kind == src.TAR:
            yield (task.index, 0, task.set, task.kind, task.source, None, None, settings)
            continue
        for unit_no, start in enumerate(range(0, len(task.keys), UNIT_SIZE)):
            yield (
                task.index,
                unit_no,
                task.set,
                task.kind,
                task.source,
                task.keys[start : start + UNIT_SIZE],
                task.labels[start : start + UNIT_SIZE],
                settings,
            )


def _unit_count(task: Task) -> int:
    return 1 if task.kind == src.TAR else max(1, -(-len(task.keys) // UNIT_SIZE))


def run_manifest(cfg) -> Path:
    """List, read, hash and decode every input; write manifest parts and _SUCCESS.json."""
    started = time.time()
    out = open_stage(cfg, STAGE)
    settings = DecodeSettings(
        max_pixels=int(cfg.decode.max_pixels) if cfg.decode.max_pixels else None,
        max_bytes=int(cfg.decode.max_bytes) if cfg.decode.max_bytes else None,
        extensions=tuple(sorted(e.lower().lstrip(".") for e in cfg.manifest.extensions)),
    )
    tasks = plan_tasks(cfg, settings, int(cfg.manifest.part_size))
    overwrite = bool(cfg.get("overwrite", False))
    staging = out / STAGED  # new parts wait here; the finished manifest stays as it is until commit
    fresh = [t for t in tasks if overwrite or parquet_fingerprint(out / t.part_name) != t.fingerprint]
    todo = [t for t in fresh if overwrite or parquet_fingerprint(staging / t.part_name) != t.fingerprint]
    stale = sorted(p for p in out.glob("part-*.parquet") if int(p.stem.split("-")[1]) >= len(tasks))
    if not fresh and not stale and is_done(out):
        log.info("manifest: %d parts up to date, nothing to do", len(tasks))
        return out
    staging.mkdir(exist_ok=True)
    remove_stale_temps(staging)
    log.info(
        "manifest: %d tasks, %d to (re)do, %d staged by an interrupted run",
        len(tasks),
        len(todo),
        len(fresh) - len(todo),
    )

    units = list(_units(todo, settings))
    remaining = {t.index: _unit_count(t) for t in todo}
    collected: dict[int, dict[int, list[dict]]] = {t.index: {} for t in todo}
    by_index = {t.index: t for t in todo}
    workers = resolve_workers(cfg.workers)
    decoded = 0
    with tqdm(
        total=sum(len(t.keys) for t in todo if t.kind != src.TAR) or None,
        unit="img",
        desc="manifest",
        disable=not show_progress(cfg.progress),
    ) as bar:
        for task_index, unit_no, rows in process_map(process_unit, units, workers):
            collected[task_index][unit_no] = rows
            remaining[task_index] -= 1
            decoded += len(rows)
            bar.update(len(rows))
            if remaining[task_index] == 0:
                parts = collected.pop(task_index)
                all_rows = [row for n in sorted(parts) for row in parts[n]]
                task = by_index[task_index]
                write_part(staging / task.part_name, all_rows, task.fingerprint)

    renewed = {t.part_name for t in fresh}
    frame = (
        pd.concat(
            [pd.read_parquet((staging if t.part_name in renewed else out) / t.part_name) for t in tasks],
            ignore_index=True,
        )
        if tasks
        else pd.DataFrame(columns=SCHEMA.names)
    )
    _check_unique_ids(frame)  # before anything is replaced
    commit_staged_parts(out, sorted(renewed), remove=stale)
    counts = frame.groupby(["set", "status"]).size()
    write_success(
        out,
        parts=len(tasks),
        parts_written=len(todo),
        rows=int(len(frame)),
        rows_decoded_this_run=decoded,
        counts={f"{s}/{st}": int(n) for (s, st), n in counts.items()},
        seconds=round(time.time() - started, 3),
        workers=workers,
    )
    log.info(
        "manifest: %d rows (%d ok) in %d parts, %.1f s",
        len(frame),
        int((frame.status == OK).sum()),
        len(tasks),
        time.time() - started,
    )
    return out


def _check_unique_ids(frame: pd.DataFrame) -> None:
    dup = frame[frame["id"].duplicated(keep=False)]
    if len(dup):
        sample = dup.sort_values("id").head(6)[["id", "set", "source", "key"]].to_dict("records")
        raise RuntimeError(f"manifest id collision between different inputs (rename one of them): {sample}")


def manifest_parts(run_dir: str | os.PathLike) -> list[Path]:
    return sorted((Path(run_dir) / STAGE).glob("part-*.parquet"))


def read_manifest(
    run_dir: str | os.PathLike,
    status: str | None = OK,
    sets: Iterable[str] | None = None,
    columns: Iterable[str] | None = None,
    ids=None,
) -> pd.DataFrame:
    """All manifest rows (or those of one status / some sets / some `ids`), in part order;
    `columns`: only those (and what the filters need), for readers of large manifests. The
    filters run on each part's Arrow table, so memory holds only the selected rows as pandas
    objects."""
    parts = manifest_parts(run_dir)
    if not parts:
        raise MissingInputError(f"no manifest in {run_dir}: run `lvd manifest` first")
    nullable = {pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype()}.get
    wanted = (
        None
        if columns is None
        else list(
            dict.fromkeys(
                [
                    *columns,
                    *(["status"] if status else []),
                    *(["set"] if sets is not None else []),
                    *(["id"] if ids is not None else []),
                ]
            )
        )
    )
    wanted_sets = None if sets is None else pa.array(list(sets), pa.string())
    wanted_ids = None if ids is None else pa.array(np.asarray(ids, np.int64))
    frames = []
    for path in parts:
        table = pq.read_table(path, columns=wanted)
        if status is not None:
            table = table.filter(pc.equal(table["status"], status))
        if wanted_sets is not None:
            table = table.filter(pc.is_in(table["set"], value_set=wanted_sets))
        if wanted_ids is not None:
            table = table.filter(pc.is_in(table["id"], value_set=wanted_ids))
        frames.append(table.to_pandas(types_mapper=nullable))
    return pd.concat(frames, ignore_index=True)


def manifest_counts(run_dir: str | os.PathLike) -> dict[tuple[str, str], int]:
    """{(set, status): rows}, sorted, counted part by part in Arrow (two columns read)."""
    counts: dict[tuple[str, str], int] = {}
    for path in manifest_parts(run_dir):
        table = (
            pq.read_table(path, columns=["set", "status"]).group_by(["set", "status"]).aggregate([([], "count_all")])
        )
        for name, status, n in zip(*(table[c].to_pylist() for c in ("set", "status", "count_all"))):
            counts[(name, status)] = counts.get((name, status), 0) + int(n)
    return dict(sorted(counts.items()))


def manifest_sets(run_dir: str | os.PathLike, status: str | None = OK) -> list[str]:
    """The distinct `set` names of the manifest's rows (of one status), sorted; reads one column."""
    names: set[str] = set()
    for path in manifest_parts(run_dir):
        table = pq.read_table(path, columns=["set", "status"] if status is not None else ["set"])
        if status is not None:
            table = table.filter(pc.equal(table["status"], status))
        names.update(pc.unique(table["set"]).to_pylist())
    return sorted(names)


__all__ = [
    "run_manifest",
    "read_manifest",
    "manifest_sets",
    "manifest_counts",
    "manifest_parts",
    "stable_id",
    "SCHEMA",
    "OK",
    "QUARANTINED",
]
