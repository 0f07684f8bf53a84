"""The manifest stage: one row per input image, decoded once to prove it is usable.

reader  : the configured sources are listed into tasks, one manifest part each (a chunk of a
          folder or path list, or one tar shard);
mapper  : worker processes read each file, hash its bytes and decode it (JPEGs at reduced
          DCT scale: enough to prove the data is whole, far cheaper than full size), in
          `curate.manifest_rows`;
writer  : the parent writes each part atomically as soon as all of its rows are in.

Under torchrun (`python -m lvd.curate.manifest CONFIG`) every rank lists the same tasks and
decodes its round-robin share of the parts left to do with its own worker processes (the
host's cores shared among its ranks); rank 0 checks the ids and commits once every rank has
staged its parts. A part's name and bytes depend only on its task, never on the rank count, so
the folder is byte for byte the one a single process writes.

Each part is a part of the stage runner (`curate.stage`) whose fingerprint is its task's (inputs,
file sizes and times, decoding limits): a rerun skips every part whose fingerprint still
matches, so nothing new means no work, and a killed run resumes from the parts it staged and
ends with the same files as an uninterrupted one. The readers of the manifest are
`lvd.common.run_folder`'s (imported here for the stages).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from lvd.common.errors import InputFormatError
from lvd.common.run_folder import MANIFEST_SCHEMA as SCHEMA
from lvd.common.run_folder import (  # noqa: F401 (the manifest's readers, where the stages look for them)
    manifest_counts,
    manifest_parts,
    manifest_sets,
    read_manifest,
)
from lvd.curate import sources as src
from lvd.curate.config import as_list, named_sources
from lvd.curate.manifest_rows import OK, QUARANTINED, DecodeSettings, process_unit, stable_id
from lvd.curate.stage import Parts, Stage, open_stage, torchrun_main, write_table
from lvd.curate.workers import process_map, rank_workers, show_progress

log = logging.getLogger(__name__)

STAGE = "manifest"
# Files per work unit handed to a worker: small enough to balance, large enough to amortise.
UNIT_SIZE = 32


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
    def part(self) -> str:
        return f"{self.index:05d}"

    @property
    def part_name(self) -> str:
        return f"part-{self.part}.parquet"


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
                keys, labels = src.read_path_list(source)
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


# ---------------------------------------------------------------- writer: rows -> parts


def write_part(path: Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names} for row in rows], schema=SCHEMA)
    write_table(path, table)


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


def decode_settings(cfg) -> DecodeSettings:
    return DecodeSettings(
        max_pixels=int(cfg.decode.max_pixels) if cfg.decode.max_pixels else None,
        max_bytes=int(cfg.decode.max_bytes) if cfg.decode.max_bytes else None,
        extensions=tuple(sorted(e.lower().lstrip(".") for e in cfg.manifest.extensions)),
    )


def write_parts(cfg, todo: list[Task], parts: Parts, settings: DecodeSettings, workers: int, rank: int) -> None:
    """Read, hash and decode every input of the tasks in worker processes; stage each part (and
    its marker, which counts its rows) as soon as all of its rows are in."""
    remaining = {t.index: _unit_count(t) for t in todo}
    collected: dict[int, dict[int, list[dict]]] = {t.index: {} for t in todo}
    by_index = {t.index: t for t in todo}
    with tqdm(
        total=sum(len(t.keys) for t in todo if t.kind != src.TAR) or None,
        unit="img",
        desc="manifest",
        disable=not show_progress(cfg.progress) or rank != 0,
    ) as bar:
        for task_index, unit_no, rows in process_map(process_unit, list(_units(todo, settings)), workers):
            collected[task_index][unit_no] = rows
            remaining[task_index] -= 1
            bar.update(len(rows))
            if remaining[task_index] == 0:
                units, task = collected.pop(task_index), by_index[task_index]
                part_rows = [row for n in sorted(units) for row in units[n]]
                write_part(parts.path(task.part, task.part_name), part_rows)
                parts.done(task.part, rows=len(part_rows))


def run_manifest(cfg) -> Path:
    """List, read, hash and decode every input; write manifest parts and _SUCCESS.json."""
    settings = decode_settings(cfg)
    with open_stage(cfg, STAGE, device="cpu") as stage:
        tasks = plan_tasks(cfg, settings, int(cfg.manifest.part_size))
        parts = stage.parts({t.part: (stage.fingerprint_of(t.fingerprint), [t.part_name]) for t in tasks})
        if stage.up_to_date:
            log.info("manifest: %d parts up to date, nothing to do", len(tasks))
            return stage.folder
        mine, ranks = set(parts.mine), stage.ranks
        log.info(
            "manifest: %d tasks, %d to (re)do, %d staged by an interrupted run%s",
            len(tasks),
            len(parts.todo),
            len(parts.fresh) - len(parts.todo),
            f"; {len(mine)} on rank {ranks.rank} of {ranks.world}" if ranks.world > 1 else "",
        )
        workers = rank_workers(cfg.workers, ranks)
        write_parts(cfg, [t for t in tasks if t.part in mine], parts, settings, workers, ranks.rank)
        if ranks.rank != 0:  # rank 0 checks and commits every rank's parts
            return stage.commit()
        return commit_manifest(stage, tasks, parts, workers)


def commit_manifest(stage: Stage, tasks: list[Task], parts: Parts, workers: int) -> Path:
    """Once every rank has staged its parts: refuse an id shared by two inputs, count, commit."""
    stage.settle()
    columns = ["id", "set", "source", "key", "status"]
    frame = pd.concat(
        [pq.read_table(parts.current(t.part, t.part_name), columns=columns).to_pandas() for t in tasks]
        or [pd.DataFrame(columns=columns)],
        ignore_index=True,
    )
    _check_unique_ids(frame)  # before anything is replaced
    counts = frame.groupby(["set", "status"]).size()
    stage.commit(
        parts=len(tasks),
        parts_written=len(parts.fresh),
        rows=int(len(frame)),
        rows_decoded_this_run=sum(int(parts.info(name).get("rows", 0)) for name in parts.todo),
        counts={f"{s}/{st}": int(n) for (s, st), n in counts.items()},
        workers_per_rank=workers,
    )
    log.info("manifest: %d rows (%d ok) in %d parts", len(frame), int((frame.status == OK).sum()), len(tasks))
    return stage.folder


def _check_unique_ids(frame: pd.DataFrame) -> None:
    dup = frame[frame["id"].duplicated(keep=False)]
    if len(dup):
        sample = dup.sort_values("id").head(6)[["id", "set", "source", "key"]].to_dict("records")
        raise InputFormatError(f"manifest id collision between different inputs (rename one of them): {sample}")


def main(argv: list[str] | None = None) -> int:
    """`python -m lvd.curate.manifest CONFIG [key=value ...]`: the entry point for torchrun."""
    return torchrun_main(run_manifest, "lvd.curate.manifest", argv)


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


if __name__ == "__main__":
    sys.exit(main())
