"""The stage runner on its own: one fingerprint rule, staged outputs that replace finished ones
only at commit, parts that resume, ranks that share the parts, and the schema version."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from lvd.common.errors import InputFormatError, MissingInputError, UserError
from lvd.common.run_folder import SCHEMA_VERSION, SUCCESS_NAME, content_fingerprint, is_done, read_success
from lvd.curate.stage import STAGED, marker_name, open_stage, write_success


def _cfg(run_dir, **extra):
    return OmegaConf.create({"run_dir": str(run_dir), "overwrite": False, **extra})


def _finished(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    write_success(folder, run="old")


def _whole_files(cfg, texts: dict, **info):
    """An invocation of stage `s` that writes whole files."""
    with open_stage(cfg, "s", settings={"texts": texts}) as stage:
        if stage.up_to_date:
            return None
        for name, text in texts.items():
            stage.path(name).write_text(text)
        return stage.commit(**info)


def test_an_invocation_that_fails_before_commit_leaves_the_old_outputs(tmp_path):
    folder = tmp_path / "s"
    _finished(folder, **{"a.txt": "old a", "b.txt": "old b"})
    with pytest.raises(RuntimeError, match="boom"):
        with open_stage(_cfg(tmp_path), "s") as stage:
            stage.path("a.txt").write_text("new a")
            raise RuntimeError("boom")
    assert (folder / "a.txt").read_text() == "old a" and (folder / "b.txt").read_text() == "old b"
    assert json.loads((folder / SUCCESS_NAME).read_text())["run"] == "old"
    assert sorted(p.name for p in folder.iterdir()) == ["_SUCCESS.json", "a.txt", "b.txt"]  # nothing staged left


def test_a_write_error_midway_is_a_failed_invocation(tmp_path):
    folder = tmp_path / "s"
    _finished(folder, **{"a.txt": "old a"})
    with pytest.raises(OSError):
        with open_stage(_cfg(tmp_path), "s") as stage:
            stage.path("a.txt").write_text("new a")
            raise OSError(28, "No space left on device")
    assert (folder / "a.txt").read_text() == "old a" and is_done(folder)


def test_commit_replaces_everything_and_writes_the_marker_last(tmp_path):
    folder = tmp_path / "s"
    _finished(folder, **{"a.txt": "old a", "b.txt": "old b"})
    _whole_files(_cfg(tmp_path), {"a.txt": "new a", "sub/c.txt": "new c"}, run="new")
    assert (folder / "a.txt").read_text() == "new a" and (folder / "sub/c.txt").read_text() == "new c"
    assert not (folder / "b.txt").exists()  # what the new outputs do not have goes
    record = read_success(folder)
    assert record["run"] == "new" and record["schema"] == SCHEMA_VERSION and record["stage"] == "s"
    assert record["world_size"] == 1 and not (folder / STAGED).exists()


def test_staging_refuses_paths_outside_the_folder_and_the_marker(tmp_path):
    with open_stage(_cfg(tmp_path), "s") as stage:
        for bad in ("../x", "/etc/x", SUCCESS_NAME, f"{STAGED}/x"):
            with pytest.raises(ValueError, match="cannot stage"):
                stage.path(bad)


def test_the_fingerprint_rule(tmp_path):
    """Up to date: the same settings and the same upstream content; anything else, or overwrite, redoes."""
    cfg = _cfg(tmp_path)
    _finished(tmp_path / "up", **{"x.txt": "1"})
    texts = {"a.txt": "a"}

    def run(cfg, texts=texts):
        with open_stage(cfg, "s", settings=texts, inputs=("up",)) as stage:
            if stage.up_to_date:
                return False
            stage.path("a.txt").write_text(str(texts))
            stage.commit()
            return True

    assert run(cfg) and not run(cfg)
    assert run(cfg, {"a.txt": "other"}) and not run(cfg, {"a.txt": "other"})
    assert run(_cfg(tmp_path, overwrite=True), {"a.txt": "other"})
    write_success(tmp_path / "up", run="changed")  # the stage it reads finished again, with other outputs
    assert run(cfg, {"a.txt": "other"}) and not run(cfg, {"a.txt": "other"})
    moved = read_success(tmp_path / "s")
    moved.update(host="elsewhere", finished_at="2030-01-01T00:00:00Z", seconds=9.0)
    (tmp_path / "s" / SUCCESS_NAME).write_text(json.dumps(moved))
    assert not run(cfg, {"a.txt": "other"})  # where and when it ran is not what it holds
    legacy = {k: v for k, v in moved.items() if k != "schema"}  # the record of an older lvd
    (tmp_path / "s" / SUCCESS_NAME).write_text(json.dumps(legacy))
    assert run(cfg, {"a.txt": "other"})
    with pytest.raises(MissingInputError, match="run `lvd never` first"):
        open_stage(cfg, "s", inputs=("never",)).__enter__()


def test_content_changes_only_with_the_outputs(tmp_path):
    _whole_files(_cfg(tmp_path), {"a.txt": "same"}, n=1)
    first = content_fingerprint(tmp_path / "s")
    _whole_files(_cfg(tmp_path, overwrite=True), {"a.txt": "same"}, n=1)
    assert content_fingerprint(tmp_path / "s") == first
    _whole_files(_cfg(tmp_path), {"a.txt": "different"}, n=1)
    assert content_fingerprint(tmp_path / "s") != first


def _plan(names, tag="v1"):
    return {n: (f"{tag}-{n}", [f"part-{n}.txt", f"copy/part-{n}.txt"]) for n in names}


def _parts_invocation(cfg, names, tag="v1", fail_after=None, written=None):
    with open_stage(cfg, "p") as stage:
        parts = stage.parts(_plan(names, tag))
        if stage.up_to_date:
            return stage.folder
        for n in parts.mine:
            for f in parts.plan[n][1]:
                parts.path(n, f).write_text(f"{tag} {n}")
            parts.done(n, rows=1)
            if written is not None:
                written.append(n)
            if fail_after is not None and len(written) == fail_after:
                raise MemoryError("failed in the middle")
        return stage.commit(parts=len(parts.plan))


def test_commit_staged_parts_moves_parts_in_order_and_removes_what_the_new_run_lacks(tmp_path):
    cfg = _cfg(tmp_path)
    _parts_invocation(cfg, ["0", "1", "9"])
    folder = tmp_path / "p"
    assert (folder / "part-9.txt").exists() and (folder / marker_name("9")).exists()
    written = []
    _parts_invocation(cfg, ["0", "1"], "v2", written=written)
    assert written == ["0", "1"]
    assert (folder / "part-0.txt").read_text() == "v2 0" and (folder / "copy/part-1.txt").read_text() == "v2 1"
    assert not (folder / "part-9.txt").exists() and not (folder / marker_name("9")).exists()
    assert not (folder / STAGED).exists() and read_success(folder)["parts"] == 2


def test_parts_marked_by_an_older_lvd_stay_finished_and_take_the_new_marker_name(tmp_path):
    cfg = _cfg(tmp_path)
    _parts_invocation(cfg, ["0", "1"])
    folder = tmp_path / "p"
    for n in "01":  # the folder as lvd wrote it when markers were named done-PART.json
        os.replace(folder / marker_name(n), folder / f"done-{n}.json")
    written = []
    _parts_invocation(cfg, ["0", "1", "2"], written=written)
    assert written == ["2"]  # the two finished parts were not done again
    assert sorted(p.name for p in folder.glob("*done-*")) == [marker_name(n) for n in "012"]


def test_a_failed_invocation_keeps_its_staged_parts_and_the_next_resumes(tmp_path):
    cfg = _cfg(tmp_path)
    _parts_invocation(cfg, ["0", "1", "2"])
    folder = tmp_path / "p"
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    written = []
    with pytest.raises(MemoryError):
        _parts_invocation(cfg, ["0", "1", "2"], "v2", fail_after=2, written=written)
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.parts[0] != STAGED} == before  # the finished run, untouched
    written.clear()
    _parts_invocation(cfg, ["0", "1", "2"], "v2", written=written)
    assert written == ["2"]  # the two staged parts were not done again
    assert [(folder / f"part-{n}.txt").read_text() for n in "012"] == ["v2 0", "v2 1", "v2 2"]
    written.clear()
    (folder / "part-1.txt").unlink()  # a lost part file: that part alone is done again
    _parts_invocation(cfg, ["0", "1", "2"], "v2", written=written)
    assert written == ["1"] and (folder / "part-1.txt").read_text() == "v2 1"


def test_commit_staged_parts_with_a_missing_part_keeps_the_rest_staged(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(RuntimeError, match="never written"):
        with open_stage(cfg, "p") as stage:
            parts = stage.parts(_plan(["0", "1"]))
            for f in parts.plan["0"][1]:
                parts.path("0", f).write_text("0")
            parts.done("0")
            stage.commit()  # part 1 was never staged
    assert not is_done(tmp_path / "p") and (tmp_path / "p" / STAGED / marker_name("0")).is_file()


KILL = """
import os, signal, sys
from omegaconf import OmegaConf
from lvd.curate.stage import open_stage
cfg = OmegaConf.create({{"run_dir": {run!r}, "overwrite": False}})
with open_stage(cfg, "p") as stage:
    parts = stage.parts({{n: ("fp-" + n, ["part-" + n + ".txt"]) for n in "0123"}})
    for n in parts.mine:
        parts.path(n, "part-" + n + ".txt").write_text("part " + n)
        if n == {kill_at!r}:
            os.kill(os.getpid(), signal.SIGKILL)  # the file written, its marker not yet
        parts.done(n)
        print(n, flush=True)
    stage.commit()
"""


@pytest.mark.slow
def test_a_killed_invocation_resumes_from_what_it_staged(tmp_path):
    first = subprocess.run(
        [sys.executable, "-c", KILL.format(run=str(tmp_path), kill_at="2")], capture_output=True, text=True
    )
    assert first.returncode == -signal.SIGKILL and first.stdout.split() == ["0", "1"]
    assert not is_done(tmp_path / "p") and not list((tmp_path / "p").glob("part-*"))  # nothing committed
    second = subprocess.run(
        [sys.executable, "-c", KILL.format(run=str(tmp_path), kill_at=None)], capture_output=True, text=True
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.split() == ["2", "3"]  # the killed run's two finished parts are not done again
    assert [(tmp_path / "p" / f"part-{n}.txt").read_text() for n in "0123"] == [f"part {n}" for n in "0123"]
    assert is_done(tmp_path / "p") and not (tmp_path / "p" / STAGED).exists()


def _rank_worker(rank, world, folder):
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        cfg = _cfg(f"{folder}/run")
        with open_stage(cfg, "p", device="cpu") as stage:
            parts = stage.parts({n: (f"fp-{n}", [f"part-{n}.txt"]) for n in "01234"})
            assert stage.ranks.world == world
            if rank == 1:
                time.sleep(1)  # rank 0 reaches its commit first
            for n in parts.mine:
                parts.path(n, f"part-{n}.txt").write_text(f"rank {rank}")
                parts.done(n, rank=rank)
            if stage.ranks.rank != 0:
                stage.commit()
            else:  # reads what every rank staged: waits for them first
                stage.commit(parts=5, owners={n: parts.info(n)["rank"] for n in parts.plan})
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_staged_parts_with_ranks_are_shared_and_committed_once(tmp_path):
    mp.start_processes(_rank_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    folder = tmp_path / "run" / "p"
    owners = [int((folder / f"part-{n}.txt").read_text().split()[1]) for n in "01234"]
    assert owners == [0, 1, 0, 1, 0]  # round-robin over the parts left to do
    assert [json.loads((folder / marker_name(n)).read_text())["rank"] for n in "01234"] == owners
    record = read_success(folder)
    assert record["world_size"] == 2 and record["parts"] == 5 and not (folder / STAGED).exists()
    assert record["owners"] == dict(zip("01234", owners))


def test_a_stage_written_by_a_newer_lvd_is_refused_with_the_stage_to_run_again(tmp_path):
    (tmp_path / "manifest").mkdir()
    (tmp_path / "manifest" / SUCCESS_NAME).write_text(json.dumps({"schema": SCHEMA_VERSION + 1}))
    with pytest.raises(InputFormatError, match=r"newer lvd .* run `lvd manifest` again") as caught:
        open_stage(_cfg(tmp_path), "s", inputs=("manifest",)).__enter__()
    assert isinstance(caught.value, UserError) and "\n" not in str(caught.value)
    (tmp_path / "manifest" / SUCCESS_NAME).write_text("{not json")
    with pytest.raises(InputFormatError, match="damaged.*run `lvd manifest` again"):
        open_stage(_cfg(tmp_path), "s", inputs=("manifest",)).__enter__()
    (tmp_path / "manifest" / SUCCESS_NAME).write_text("{}")  # schema 1: an older lvd's, read
    with open_stage(_cfg(tmp_path), "s", inputs=("manifest",)) as stage:
        assert stage.inputs["manifest"] is not None
    assert os.path.isfile(tmp_path / "config.yaml")
