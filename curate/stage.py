"""The stage runner: every stage opens, decides what is up to date, stages and commits one way.

A stage says what it reads, what it computes and what it writes; this module does the rest:

    with open_stage(cfg, "retrieve", settings=..., inputs=("embed", "dedup"), device=...) as stage:
        if stage.up_to_date:
            return stage.folder
        rows = ...                                   # reader -> mapper
        write_frame(stage.path("neighbors.parquet"), rows, SCHEMA)   # writer (rank 0)
        return stage.commit(rows=len(rows))          # _SUCCESS.json last

A stage made of parts (manifest, embed, shards; dedup's three files) declares them, each with
its fingerprint and files; a rerun does only the parts that are not finished:

        parts = stage.parts({"00000": (fp, ["part-00000.parquet"]), ...})
        for name in parts.mine:                      # this rank's share of what is left to do
            write(parts.path(name, "part-00000.parquet"))
            parts.done(name, rows=...)               # the part's marker, after its files

Rules (the `Stage` contract of docs/architecture.md; no stage has its own copy):
- One fingerprint rule: every fingerprint is `fingerprint(SCHEMA_VERSION, stage, what it
  depends on)`. A stage's depends on its settings and on the content fingerprints of the stage
  folders it reads (`lvd.common.run_folder.content_fingerprint`); a part's on its own inputs. A
  stage is up to date when its `_SUCCESS.json` records this schema and fingerprint and every
  part is finished; a part is finished when its `_done-PART.json` records its fingerprint and its
  files are there. `overwrite=true` makes nothing up to date.
- Nothing replaces a finished output before the commit: new files are written under
  STAGE/.staged/. Parts stay staged across invocations (a killed or failed run resumes from
  them); whole files staged by an invocation that fails are removed.
- The commit (rank 0, once every rank has staged its parts) removes `_SUCCESS.json`, removes
  what the new outputs no longer have, moves each new part's files and then its marker, then the
  whole files, and writes `_SUCCESS.json` last: schema, stage, fingerprint, content (a hash of
  the outputs, which later stages' fingerprints take), world size, seconds, versions, host and
  the stage's own counts. Only a kill inside that short window leaves the stage unfinished
  (its marker is gone, so the next run redoes what is missing); none leaves a stage that says it
  is finished over files of two runs.
- Ranks: with a `device`, the stage joins the torchrun group (and leaves it when it ends); rank 0
  makes the folder, every rank decides the same things from the same files, and the commit is
  followed by a barrier.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from lvd.common.atomic import atomic_path, atomic_write_json, remove_stale_temps
from lvd.common.errors import UserError
from lvd.common.ranks import Ranks, join_group, leave_group
from lvd.common.run_folder import (
    SCHEMA_VERSION,
    SUCCESS_NAME,
    content_fingerprint,
    fingerprint,
    finished,
    read_success,
    stage_dir,
)

#: Where a stage's new files wait for the commit.
STAGED = ".staged"


def overwrite_requested(cfg) -> bool:
    """`overwrite=true`: every output is recomputed, finished or not (the one reader of the key)."""
    return bool(cfg.get("overwrite", False))


def marker_name(part: str) -> str:
    """A part's marker file. The leading underscore keeps it out of `pd.read_parquet(STAGE)` and
    pyarrow datasets, which skip names starting with `_` or `.`, as they skip `_SUCCESS.json`."""
    return f"_done-{part}.json"


def _legacy_marker_name(part: str) -> str:
    """The marker's name in folders that lvd wrote before the underscore (read, then renamed)."""
    return f"done-{part}.json"


def _marker_in(folder: Path, part: str) -> Path:
    path = folder / marker_name(part)
    legacy = folder / _legacy_marker_name(part)
    return legacy if not path.is_file() and legacy.is_file() else path


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("numpy", "pandas", "pyarrow", "PIL", "torch", "faiss", "webdataset"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "unknown")
    try:
        from importlib.metadata import version

        versions["lvd"] = version("lvd")
    except Exception:
        pass
    return versions


def success_record(**info) -> dict:
    """A `_SUCCESS.json` record: `info` with the schema version, the host, the time and the versions."""
    return {
        "schema": SCHEMA_VERSION,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "versions": _versions(),
        **info,
    }


def write_success(folder: str | os.PathLike, **info) -> Path:
    """Write FOLDER/_SUCCESS.json (`success_record`)."""
    return atomic_write_json(Path(folder) / SUCCESS_NAME, success_record(**info))


def _file_digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha1()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_relative(name: str) -> None:
    if Path(name).is_absolute() or ".." in Path(name).parts or name == SUCCESS_NAME or name.startswith(STAGED):
        raise ValueError(f"cannot stage {name!r}: a path inside the stage folder other than its {SUCCESS_NAME}")


class Parts:
    """The parts of a stage: which are finished, which an interrupted run staged, which are left."""

    def __init__(self, stage: Stage, plan: dict[str, tuple[str, list[str]]]):
        self.stage, self.plan = stage, plan
        for _, files in plan.values():
            for name in files:
                _check_relative(name)
        redo = stage.overwrite
        self.fresh = [n for n in plan if redo or not self._finished(stage.folder, n)]  # not in the folder
        self.todo = [n for n in self.fresh if redo or not self._finished(stage.staging, n)]  # nor staged

    def _finished(self, folder: Path, name: str) -> bool:
        fp, files = self.plan[name]
        marker = _read_marker(_marker_in(folder, name))
        return marker is not None and marker.get("fingerprint") == fp and all((folder / f).is_file() for f in files)

    @property
    def mine(self) -> list[str]:
        """This rank's share of the parts left to do."""
        ranks = self.stage.ranks
        return self.todo[ranks.rank :: ranks.world]

    def path(self, part: str, file: str) -> Path:
        """Where this invocation writes one of the part's files (write it atomically)."""
        if file not in self.plan[part][1]:
            raise ValueError(f"{file!r} is not a file of part {part!r}")
        path = self.stage.staging / file
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def done(self, part: str, content: str | None = None, **info) -> None:
        """Mark a staged part finished, after its files. `content` names what the files hold (for
        the fingerprints of later stages); by default a hash of their bytes."""
        fp, files = self.plan[part]
        staged = [self.stage.staging / f for f in files]
        missing = [str(p) for p in staged if not p.is_file()]
        if missing:
            raise RuntimeError(f"part {part!r} marked done without its files {missing}")
        record = {"fingerprint": fp, "content": content or _file_digest(staged), **info}
        atomic_write_json(self.stage.staging / marker_name(part), record)

    def current(self, part: str, file: str) -> Path:
        """A part's file as this invocation sees it: staged if the part is new, else the finished one."""
        return (self.stage.staging if part in self.fresh else self.stage.folder) / file

    def info(self, part: str) -> dict:
        """What the part's marker says (its fingerprint, content and the stage's own fields),
        once every rank has staged its parts."""
        self.stage.settle()
        marker = _marker_in(self.stage.staging if part in self.fresh else self.stage.folder, part)
        record = _read_marker(marker)
        if record is None:
            raise RuntimeError(f"part {part!r} has no marker at {marker}")
        return record

    def outputs(self) -> set[str]:
        return {f for _, files in self.plan.values() for f in files} | {marker_name(p) for p in self.plan}

    def content(self) -> str:
        return fingerprint(sorted((p, self.info(p).get("content")) for p in self.plan))


class Stage:
    """One invocation of a stage: its folder, ranks, fingerprint, staged outputs and commit."""

    def __init__(self, cfg, name: str, ranks: Ranks, settings, inputs: Iterable[str], optional: Iterable[str]):
        self.cfg, self.name, self.ranks = cfg, name, ranks
        self.run_dir = Path(cfg.run_dir)
        self.folder = stage_dir(self.run_dir, name)
        self.staging = self.folder / STAGED
        self.overwrite = overwrite_requested(cfg)
        self.started = time.time()
        self.committed = False
        self._settled = False
        self._files: dict[str, Path] = {}
        self._kept: set[str] = set()
        self._parts: Parts | None = None
        for stage in inputs:  # a missing or unreadable input is refused before anything is made
            finished(stage_dir(self.run_dir, stage), needed_by=name)
        if ranks.rank == 0:
            from lvd.curate.config import save_config

            self.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.folder, recursive=True)  # a killed invocation's half-written files
            save_config(cfg, self.run_dir)
        ranks.barrier()
        self.inputs = {s: content_fingerprint(stage_dir(self.run_dir, s)) for s in (*inputs, *optional)}
        self.fingerprint = self.fingerprint_of(settings, self.inputs)

    def fingerprint_of(self, *values) -> str:
        """The fingerprint rule: this schema, this stage, and what the output depends on."""
        return fingerprint(SCHEMA_VERSION, self.name, *values)

    def parts(self, plan: dict[str, tuple[str, list[str]]]) -> Parts:
        """Declare the stage's parts: {name: (fingerprint, [files relative to the folder])}."""
        self._parts = Parts(self, plan)
        self.fingerprint = fingerprint(self.fingerprint, sorted((n, fp) for n, (fp, _) in plan.items()))
        self.ranks.barrier()  # every rank has read the markers before any rank stages a part
        return self._parts

    @property
    def up_to_date(self) -> bool:
        if self.overwrite:
            return False
        try:
            record = read_success(self.folder)
        except UserError:  # a damaged record: redo the stage
            return False
        if not record or record.get("schema") != SCHEMA_VERSION or record.get("fingerprint") != self.fingerprint:
            return False
        return self._parts is None or not self._parts.fresh

    def path(self, name: str) -> Path:
        """Where to write the new whole file `name` (relative to the folder); it replaces FOLDER/name at commit."""
        _check_relative(name)
        path = self.staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self._files[name] = path
        return path

    def current(self, name: str) -> Path:
        """A whole file as this invocation sees it: the staged one if written, else the finished one."""
        staged = self._files.get(name)
        return staged if staged is not None and staged.is_file() else self.folder / name

    def keep(self, name: str) -> None:
        """The finished FOLDER/name stays an output of the new run as it is."""
        _check_relative(name)
        self._kept.add(name)

    def settle(self) -> None:
        """Wait until every rank has staged its parts (once per invocation; every rank calls
        `commit`, which settles if the stage has not)."""
        if not self._settled:
            self.ranks.barrier()
            self._settled = True

    def commit(self, **info) -> Path:
        """Rank 0 moves the staged outputs into place and writes `_SUCCESS.json` last; every rank
        waits for it. Returns the stage folder."""
        self.settle()
        if self.ranks.rank == 0:
            self._commit(info)
        self.committed = True
        self.ranks.barrier()
        return self.folder

    def _commit(self, info: dict) -> None:
        parts = self._parts
        missing = [n for n, p in self._files.items() if not p.is_file()]
        missing += [n for n in self._kept if not (self.folder / n).is_file()]
        if parts is not None:
            missing += [marker_name(n) for n in parts.fresh if not (self.staging / marker_name(n)).is_file()]
        if missing:
            raise RuntimeError(f"outputs of {self.name} never written: {missing}")
        content = self._content()
        (self.folder / SUCCESS_NAME).unlink(missing_ok=True)
        for name in self._files:  # a sub-folder's own marker (embed/copy) goes before its files change
            if Path(name).name == SUCCESS_NAME:
                (self.folder / name).unlink(missing_ok=True)
        for name in parts.plan if parts else []:  # a finished part's marker of an older lvd keeps its part
            if name not in parts.fresh:
                os.replace(_marker_in(self.folder, name), self.folder / marker_name(name))
        self._sweep(({*parts.outputs()} if parts else set()) | set(self._files) | self._kept)
        moves = [f for p in (parts.fresh if parts else []) for f in self._parts.plan[p][1]]
        moves += [marker_name(p) for p in (parts.fresh if parts else [])]
        moves += sorted(self._files, key=lambda n: Path(n).name == SUCCESS_NAME)
        for name in moves:
            (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / name, self.folder / name)
        shutil.rmtree(self.staging, ignore_errors=True)
        info = {**info, "world_size": self.ranks.world, "seconds": round(time.time() - self.started, 3)}
        write_success(self.folder, **info, stage=self.name, fingerprint=self.fingerprint, content=content)

    def _content(self) -> str:
        files = sorted({*self._files, *self._kept})
        digests = [(n, _file_digest([self.current(n)])) for n in files]
        return fingerprint(self._parts.content() if self._parts else None, digests)

    def _sweep(self, outputs: set[str]) -> None:
        """Remove what the new outputs do not have (an earlier run's parts, levels, checkpoints)."""
        for path in sorted(self.folder.rglob("*"), key=lambda p: -len(p.parts)):
            rel = path.relative_to(self.folder)
            if rel.parts[0] == STAGED or rel.as_posix() in outputs:
                continue
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            else:
                path.unlink()

    def discard(self) -> None:
        """Forget the whole files this invocation staged (its parts stay staged for the next run)."""
        if self.ranks.rank != 0:
            return
        for path in self._files.values():
            path.unlink(missing_ok=True)
        if self.staging.is_dir():
            for folder in sorted(self.staging.rglob("*"), key=lambda p: -len(p.parts)):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            if not any(self.staging.iterdir()):
                self.staging.rmdir()


def write_table(path: str | os.PathLike, table) -> Path:
    """A pyarrow table as parquet, atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def write_frame(path: str | os.PathLike, frame, schema) -> Path:
    """A pandas frame as parquet with an explicit schema (columns in the schema's order), atomically."""
    import pyarrow as pa

    return write_table(path, pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False))


@contextlib.contextmanager
def open_stage(
    cfg, name: str, *, settings=None, inputs: Iterable[str] = (), optional: Iterable[str] = (), device=None
) -> Iterator[Stage]:
    """Open RUN/<name> for one invocation (see the module docstring). `inputs`: the stage folders
    it reads, which must have finished; `optional`: those it reads when they have; `device`: join
    the torchrun group (a stage that runs on every rank). Staged whole files of an invocation that
    does not commit are removed; the group is left however the block ends."""
    ranks = join_group(device) if device is not None else Ranks()
    try:
        stage = Stage(cfg, name, ranks, settings, tuple(inputs), tuple(optional))
        try:
            yield stage
        finally:
            if not stage.committed:
                stage.discard()
    finally:
        leave_group(ranks)


def torchrun_main(run_stage, module: str, argv: list[str] | None = None) -> int:
    """`python -m <module> CONFIG [key=value ...]`: a stage as torchrun starts it on every rank,
    under lvd's error policy (`lvd.common.errors.run_command`)."""
    from lvd.common.errors import run_command
    from lvd.common.logs import setup_logging
    from lvd.curate.config import load_config

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(f"usage: python -m {module} CONFIG [key=value ...]", file=sys.stderr)
        return 2

    def command() -> int:
        cfg = load_config(args[0], args[1:])
        setup_logging(cfg.log_level)
        print(run_stage(cfg))
        return 0

    return run_command(f"python -m {module}", command)


__all__ = [
    "STAGED",
    "Parts",
    "Stage",
    "atomic_path",
    "marker_name",
    "open_stage",
    "torchrun_main",
    "overwrite_requested",
    "success_record",
    "write_frame",
    "write_success",
    "write_table",
]
