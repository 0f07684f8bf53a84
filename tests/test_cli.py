"""The `lvd` command line: every level has help with defaults; unbuilt stages say so."""

import subprocess
import sys
from pathlib import Path

import pytest

from lvd.common.errors import EXIT_USER_ERROR
from lvd.curate import cli


def _help(*args):
    out = subprocess.run([sys.executable, "-m", "lvd.curate.cli", *args, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_top_level_help_lists_the_design_contract_commands():
    text = _help()
    for command in (
        "run",
        "manifest",
        "embed",
        "dedup",
        "cluster",
        "retrieve",
        "shards",
        "report",
        "demo",
        "index",
        "pretrain",
        "eval",
    ):
        assert f"    {command}" in text, command


@pytest.mark.parametrize("path", [["run"], ["manifest"], ["demo"], ["config"], ["eval", "knn"]])
def test_subcommand_help_shows_defaults(path):
    assert "(default:" in _help(*path)


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "lvd"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("lvd ")


def test_a_bug_in_lvd_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys, tmp_path):
    from lvd.curate import report

    def broken(cfg):
        raise KeyError("an internal key")  # not a UserError: lvd's own bug, never shown as the user's

    monkeypatch.setattr(report, "run_report", broken)
    assert cli.main(["report", "default", f"run_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'an internal key'" in err
    assert err.strip().splitlines()[-1].startswith("lvd: this is a bug in lvd")


def test_config_errors_exit_with_usage_code(capsys):
    assert cli.main(["config", "default", "embed.no_such_key=1"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "embed.no_such_key" in err and len(err.strip().splitlines()) == 1


def test_config_command_prints_the_merged_config(capsys):
    assert cli.main(["config", "demo", "run_dir=/x"]) == 0
    assert "pool:\n  - /x/data/pool" in capsys.readouterr().out.replace("- /x", "  - /x").replace("    - /x", "  - /x")


def test_manifest_through_the_cli(tmp_path, capsys):
    from zoo import write_zoo

    cases = write_zoo(tmp_path / "imgs")
    code = cli.main(
        ["manifest", "default", f"run_dir={tmp_path / 'run'}", f"sources.pool=[{tmp_path / 'imgs'}]", "workers=0"]
    )
    assert code == 0
    assert (tmp_path / "run" / "config.yaml").is_file()
    from lvd.curate.manifest import read_manifest

    assert len(read_manifest(tmp_path / "run", status=None)) == len(cases)


def _lvd(*args, cwd=None):
    """`lvd ...` as a user runs it: a new process, stderr as text."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "lvd"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lvd")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.slow
def test_user_errors_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "pool").mkdir()
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (8, 8)).save(tmp_path / "pool" / "a.png")
    run = [f"run_dir={tmp_path / 'run'}", "progress=false", "workers=0", "embed.copy_detection.weights=null"]
    # a source folder that does not exist
    _one_line_error(_lvd("manifest", "default", *run, f"sources.pool=[{tmp_path / 'missing'}]"), "missing")
    # a later stage before the earlier one
    _one_line_error(_lvd("dedup", "default", *run, "dedup.threshold=0.9"), "run `lvd manifest` first")
    # weights that are not there, and weights that are garbage (no weights_only=False advice)
    assert _lvd("manifest", "default", *run, f"sources.pool=[{tmp_path / 'pool'}]").returncode == 0
    _one_line_error(
        _lvd("embed", "default", *run, f"sources.pool=[{tmp_path / 'pool'}]", f"embed.weights={tmp_path / 'none.pth'}"),
        "weights not found",
    )
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x02not a pickle at all")
    proc = _lvd(
        "embed", "default", *run, f"sources.pool=[{tmp_path / 'pool'}]", f"embed.weights={tmp_path / 'garbage.pth'}"
    )
    _one_line_error(proc, "not a readable weights file")
    assert "weights_only=False" not in proc.stderr
    # a bad value, and the index command's errors take the same path
    _one_line_error(_lvd("dedup", "default", *run, "dedup.threshold=abc"), "dedup.threshold must be auto or a number")
    _one_line_error(_lvd("index", "search", tmp_path / "no-index", "--vector", tmp_path / "v.npy"), "lvd: error")
    # --debug shows the traceback instead
    debug = _lvd("--debug", "dedup", "default", *run, "dedup.threshold=abc")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.slow
def test_a_failed_invocation_leaves_the_finished_stage_as_it_was(tmp_path):
    """`lvd dedup CONFIG dedup.threshold=abc` after a finished dedup must not invalidate it."""
    from test_dedup_stage import synthetic_pool, write_run

    rows, vecs = synthetic_pool()
    write_run(tmp_path, rows, vecs)
    good = [
        f"run_dir={tmp_path}",
        "progress=false",
        "embed.copy_detection.weights=null",
        "dedup.threshold=0.9",
        "decontam.threshold=0.85",
    ]
    assert _lvd("dedup", "default", *good).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "dedup").iterdir()}
    _one_line_error(_lvd("dedup", "default", *good, "dedup.threshold=abc"), "dedup.threshold")
    assert {p.name: p.read_bytes() for p in (tmp_path / "dedup").iterdir()} == before
