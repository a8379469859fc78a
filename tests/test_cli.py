"""The command-line skin: commands in pipeline order, a user's mistake as one `error:` line, a bug a traceback."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from cmalign.cli.errors import reports_errors
from cmalign.cli.main import app
from cmalign.errors import CmalignError, ConfigError

runner = CliRunner()


def test_help_lists_the_commands_in_pipeline_order():
    r = runner.invoke(app, ["--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    commands = r.output[r.output.index("Commands"):]
    listed = re.findall(r"^│ ([a-z-]+) ", commands, flags=re.M)
    assert listed == ["fit", "export", "embed", "embed-merge", "embed-import", "index", "index-add", "search",
                      "serve", "adapt", "adapt-apply", "eval", "sweep", "data"]


def _app_raising(exc: Exception) -> typer.Typer:
    demo = typer.Typer()

    @demo.command()
    @reports_errors
    def go(name: str = "x"):
        raise exc

    @demo.command()
    def other():  # a second command makes typer keep `go` as a subcommand
        pass

    return demo


def test_a_cmalign_error_is_one_error_line_with_exit_status_2():
    r = runner.invoke(_app_raising(ConfigError("--k must be positive, got -1")), ["go"])
    assert r.exit_code == 2
    assert "error: --k must be positive, got -1" in r.output and "Traceback" not in r.output


def test_any_other_exception_is_a_bug_and_keeps_its_traceback():
    r = runner.invoke(_app_raising(KeyError("internal")), ["go"])
    assert r.exit_code == 1 and isinstance(r.exception, KeyError)  # not turned into a user error
    assert "error:" not in r.output


def test_every_command_reports_errors_through_the_one_wrapper():
    from cmalign.cli.main import app as main_app

    commands = list(main_app.registered_commands)
    for group in main_app.registered_groups:  # `cmalign data synth`
        commands += group.typer_instance.registered_commands
    assert len(commands) == 14
    for command in commands:
        assert getattr(command.callback, "__wrapped__", None) is not None, command.name


def test_a_real_user_error_through_the_cli_and_debug_shows_its_traceback(tmp_path):
    r = runner.invoke(app, ["search", str(tmp_path / "missing"), "--text", "a red circle"])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["--debug", "search", str(tmp_path / "missing"), "--text", "a red circle"])
    assert r.exit_code == 1 and isinstance(r.exception, CmalignError)


def test_data_synth_refuses_negative_sizes_in_one_line(tmp_path):
    r = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "s"), "--train-images", "-1"])
    assert r.exit_code == 2 and "error: image counts must be >= 0" in r.output


@pytest.mark.parametrize("name", ["fit", "export", "embed", "index", "search", "serve", "eval", "sweep"])
def test_each_command_has_help(name):
    r = runner.invoke(app, [name, "--help"], terminal_width=200)
    assert r.exit_code == 0 and "Usage:" in r.output


def test_a_training_command_without_torch_says_what_to_install(tmp_path):
    """On a runtime-only environment, `fit` is an install problem: one line naming the missing package."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["torch"] = None\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([str(Path(sys.executable).parent / "cmalign"), "fit", "--steps", "1", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "error: this command needs the Python package 'torch'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
