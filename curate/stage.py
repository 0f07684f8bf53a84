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
"""

from __future__ import annotations

import os
from pathlib import Path

from lvd.common.atomic import remove_stale_temps
from lvd.curate.runio import SUCCESS_NAME, clear_success, write_success


class StageOutputs:
    """New files of one stage invocation, held under temporary names until `commit`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.folder)
        self._staged: dict[str, Path] = {}
        self.committed = False

    def path(self, name: str) -> Path:
        """Where to write the new `name` now; it becomes FOLDER/name at `commit`."""
        if name == SUCCESS_NAME or "/" in name:
            raise ValueError(f"cannot stage {name!r}: a plain file name other than {SUCCESS_NAME}")
        tmp = self.folder / f".{name}.tmp-staged-{os.getpid()}"
        self._staged[name] = tmp
        return tmp

    def current(self, name: str) -> Path:
        """The file as this invocation sees it: the staged one if written, else the finished one."""
        staged = self._staged.get(name)
        return staged if staged is not None and staged.exists() else self.folder / name

    def commit(self, **success) -> Path:
        missing = [name for name, tmp in self._staged.items() if not tmp.exists()]
        if missing:
            raise RuntimeError(f"staged outputs never written: {missing}")
        clear_success(self.folder)
        for name, tmp in self._staged.items():
            os.replace(tmp, self.folder / name)
        self.committed = True
        return write_success(self.folder, **success)

    def discard(self) -> None:
        for tmp in self._staged.values():
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> "StageOutputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.discard()
