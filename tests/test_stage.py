"""The stage contract on its own: staged files replace finished ones only at commit, together."""

import json

import pytest

from lvd.curate.runio import SUCCESS_NAME, is_done, write_success
from lvd.curate.stage import STAGED, StageOutputs, commit_staged_parts


def _finished(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    write_success(folder, run="old")


def test_an_invocation_that_fails_before_commit_leaves_the_old_outputs(tmp_path):
    _finished(tmp_path, **{"a.txt": "old a", "b.txt": "old b"})
    with pytest.raises(RuntimeError, match="boom"):
        with StageOutputs(tmp_path) as staged:
            staged.path("a.txt").write_text("new a")
            staged.remove("b.txt")
            raise RuntimeError("boom")
    assert (tmp_path / "a.txt").read_text() == "old a" and (tmp_path / "b.txt").read_text() == "old b"
    assert json.loads((tmp_path / SUCCESS_NAME).read_text())["run"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_SUCCESS.json", "a.txt", "b.txt"]  # no temporaries left


def test_a_write_error_midway_is_a_failed_invocation(tmp_path):
    _finished(tmp_path, **{"a.txt": "old a"})
    with pytest.raises(OSError):
        with StageOutputs(tmp_path) as staged:
            staged.path("a.txt").write_text("new a")
            raise OSError(28, "No space left on device")
    assert (tmp_path / "a.txt").read_text() == "old a" and is_done(tmp_path)


def test_commit_replaces_everything_and_writes_the_marker_last(tmp_path):
    _finished(tmp_path, **{"a.txt": "old a", "b.txt": "old b"})
    with StageOutputs(tmp_path) as staged:
        staged.path("a.txt").write_text("new a")
        staged.path("sub/c.txt").write_text("new c")
        staged.remove("b.txt")
        staged.commit(run="new")
    assert (tmp_path / "a.txt").read_text() == "new a" and (tmp_path / "sub/c.txt").read_text() == "new c"
    assert not (tmp_path / "b.txt").exists()
    assert json.loads((tmp_path / SUCCESS_NAME).read_text())["run"] == "new"


def test_staging_refuses_paths_outside_the_folder_and_the_marker(tmp_path):
    staged = StageOutputs(tmp_path)
    for bad in ("../x", "/etc/x", SUCCESS_NAME):
        with pytest.raises(ValueError, match="cannot stage"):
            staged.path(bad)


def test_commit_staged_parts_moves_parts_in_order_and_removes_what_the_new_run_lacks(tmp_path):
    _finished(tmp_path, **{"part-0.bin": "old 0", "part-9.bin": "old 9"})
    (tmp_path / STAGED / "copy").mkdir(parents=True)
    (tmp_path / STAGED / "part-0.bin").write_text("new 0")
    (tmp_path / STAGED / "copy" / "part-0.bin").write_text("new copy 0")
    commit_staged_parts(tmp_path, ["part-0.bin", "copy/part-0.bin"], remove=[tmp_path / "part-9.bin"])
    assert (tmp_path / "part-0.bin").read_text() == "new 0"
    assert (tmp_path / "copy" / "part-0.bin").read_text() == "new copy 0"
    assert not (tmp_path / "part-9.bin").exists() and not (tmp_path / STAGED).exists()
    assert not is_done(tmp_path)  # the caller writes the marker once its summary is known


def test_commit_staged_parts_with_a_missing_part_keeps_the_rest_staged(tmp_path):
    _finished(tmp_path, **{"part-0.bin": "old 0"})
    (tmp_path / STAGED).mkdir()
    with pytest.raises(FileNotFoundError):
        commit_staged_parts(tmp_path, ["part-1.bin"])
    assert (tmp_path / STAGED).is_dir() and not is_done(tmp_path)  # the next run redoes the stage
