"""The stage contract: a stage's outputs are staged under temporary names and committed together.

A failed or interrupted invocation must leave the previous finished outputs exactly as they
were: a bad value, a crash, a SIGKILL or a full disk in the middle of the work may not take the
`_SUCCESS.json` of the last good run away, nor replace one of its files with a new one while
another is still old. So nothing is replaced while the work runs. Every new file is written
to a temporary name beside its final one; `commit` then removes the done marker, moves every
staged file into place and writes the done marker last. Only a kill inside that short rename
window leaves the stage unfinished (its marker is gone, so the next run redoes it); no window
leaves a stage that says it is finished over files of two runs.

    with StageOutputs(out) as staged:
        write_frame(staged.path("near.parquet"), frame, SCHEMA, fp)
        ...
        staged.commit(**success_info)

Stages made of many parts (manifest, embed, shards) resume part by part, so their new parts
live in `STAGE/.staged/` across invocations (a rerun with the same settings keeps what an
interrupted one finished) and `commit_staged_parts` moves them into place together.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lvd.common.atomic import remove_stale_temps
from lvd.curate.runio import SUCCESS_NAME, clear_success, write_success

#: Where part-wise stages keep new parts until they are committed together.
STAGED = ".staged"


def commit_staged_parts(folder: str | os.PathLike, names, *, remove=()) -> None:
    """Move FOLDER/.staged/NAME to FOLDER/NAME for each name, in the order given, after taking
    the done marker away and deleting `remove` (finished files the new run no longer has);
    the staging folder goes last. The caller writes the done marker afterwards.
    """
    folder = Path(folder)
    staging = folder / STAGED
    clear_success(folder)
    for path in remove:
        Path(path).unlink(missing_ok=True)
    for name in names:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, target)
    shutil.rmtree(staging, ignore_errors=True)


class StageOutputs:
    """New files of one stage invocation, held under temporary names until `commit`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for folder in [self.folder, *(d for d in self.folder.rglob("*") if d.is_dir())]:
            remove_stale_temps(folder)  # a killed invocation's staged files
        self._staged: dict[str, Path] = {}
        self._removed: list[Path] = []
        self._made: list[Path] = []
        self.committed = False

    def path(self, name: str) -> Path:
        """Where to write the new `name` (a path relative to the folder) now; it becomes FOLDER/name at `commit`."""
        final = self.folder / name
        if (
            final.name == SUCCESS_NAME
            and final.parent == self.folder
            or Path(name).is_absolute()
            or ".." in Path(name).parts
        ):
            raise ValueError(f"cannot stage {name!r}: a path inside the stage folder other than its {SUCCESS_NAME}")
        if not final.parent.exists():
            final.parent.mkdir(parents=True)
            self._made.append(final.parent)
        tmp = final.parent / f".{final.name}.tmp-staged-{os.getpid()}"
        self._staged[name] = tmp
        return tmp

    def remove(self, name: str) -> None:
        """Delete FOLDER/name (a file or a folder) at `commit`, not before: it belongs to the last finished run."""
        self._removed.append(self.folder / name)

    def current(self, name: str) -> Path:
        """The file as this invocation sees it: the staged one if written, else the finished one."""
        staged = self._staged.get(name)
        return staged if staged is not None and staged.exists() else self.folder / name

    def commit(self, **success) -> Path:
        missing = [name for name, tmp in self._staged.items() if not tmp.exists()]
        if missing:
            raise RuntimeError(f"staged outputs never written: {missing}")
        clear_success(self.folder)
        for path in self._removed:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        for name, tmp in self._staged.items():
            os.replace(tmp, self.folder / name)
        self.committed = True
        return write_success(self.folder, **success)

    def discard(self) -> None:
        for tmp in self._staged.values():
            tmp.unlink(missing_ok=True)
        for folder in reversed(self._made):  # folders made for staged files only, if left empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def __enter__(self) -> StageOutputs:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.discard()
