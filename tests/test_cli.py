"""The `lvd` command line: every level has help with defaults; unbuilt stages say so."""

import subprocess
import sys
from pathlib import Path

import pytest

from curate import cli


def _help(*args):
    out = subprocess.run([sys.executable, "-m", "curate.cli", *args, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_top_level_help_lists_the_design_contract_commands():
    text = _help()
    for command in ("run", "manifest", "embed", "dedup", "cluster", "retrieve", "shards", "report", "demo", "index", "pretrain", "eval"):
        assert f"    {command}" in text, command


@pytest.mark.parametrize("path", [["run"], ["manifest"], ["demo"], ["config"], ["eval", "knn"]])
def test_subcommand_help_shows_defaults(path):
    assert "(default:" in _help(*path)


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "lvd"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("lvd ")


def test_a_stage_that_is_not_built_exits_nonzero_with_a_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(cli.STAGE_TARGETS, "report", "curate._no_such_stage_module:run_report")
    code = cli.main(["report", "default", f"run_dir={tmp_path}"])
    assert code == cli.EXIT_NOT_IMPLEMENTED
    assert "not implemented yet" in capsys.readouterr().err


def test_config_errors_exit_with_usage_code(capsys):
    assert cli.main(["config", "default", "embed.no_such_key=1"]) == cli.EXIT_USAGE
    assert "embed.no_such_key" in capsys.readouterr().err


def test_config_command_prints_the_merged_config(capsys):
    assert cli.main(["config", "demo", "run_dir=/x"]) == 0
    assert "pool:\n  - /x/data/pool" in capsys.readouterr().out.replace("- /x", "  - /x").replace("    - /x", "  - /x")


def test_manifest_through_the_cli(tmp_path, capsys):
    from zoo import write_zoo

    cases = write_zoo(tmp_path / "imgs")
    code = cli.main(["manifest", "default", f"run_dir={tmp_path / 'run'}", f"sources.pool=[{tmp_path / 'imgs'}]", "workers=0"])
    assert code == 0
    assert (tmp_path / "run" / "config.yaml").is_file()
    from curate.manifest import read_manifest

    assert len(read_manifest(tmp_path / "run", status=None)) == len(cases)
