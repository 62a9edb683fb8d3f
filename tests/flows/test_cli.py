"""The `fedaudio` command line: commands, help, the stages DVC runs, clear errors."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows import cli

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _fedaudio(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """The installed console script, as a user runs it."""
    return subprocess.run([str(Path(sys.executable).with_name("fedaudio")), *args], capture_output=True, text=True,
                          timeout=120, check=False, **kwargs)  # type: ignore[call-overload]


def test_the_console_script_lists_its_commands_without_importing_the_pipeline() -> None:
    result = _fedaudio("--help")
    assert result.returncode == 0, result.stderr
    for command in ("run", "stage", "deploy", "select", "ui"):
        assert f"\n  {command} " in result.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys; from flows import cli; "
                            "print(sorted(m for m in ('torch', 'prefect', 'mlflow', 'dvc') if m in sys.modules))"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]"  # why `fedaudio --help` answers at once


def test_run_help_names_the_defaults() -> None:
    result = runner.invoke(cli.app, ["run", "--help"])
    assert result.exit_code == 0
    assert "--study NAME" in result.output and "[default: fedavg]" in result.output
    assert "-S, --set KEY=VALUE" in result.output


def test_the_studies_and_stages_are_the_pipelines() -> None:
    from tasks.studies import STUDIES

    assert set(cli.STUDIES) == set(STUDIES)
    modules = set()
    for dvc_file in [ROOT / "dvc.yaml", *ROOT.glob("studies/*/dvc.yaml")]:
        for stage in yaml.safe_load(dvc_file.read_text())["stages"].values():
            command = stage["cmd"] if isinstance(stage["cmd"], str) else stage["cmd"][0]
            if " -m flows." in command:
                modules.add(command.split(" -m ", 1)[1].split()[0])
    assert modules <= set(cli.STAGES.values())
    for module in cli.STAGES.values():
        assert callable(importlib.import_module(module).main), module


def test_stage_passes_its_options_to_the_stage_module() -> None:
    result = _fedaudio("stage", "partition", "--help")
    assert result.returncode == 0, result.stderr
    assert "--features" in result.stdout and "--params" in result.stdout  # flows.partition's own parser
    listing = runner.invoke(cli.app, ["stage"])
    assert listing.exit_code == 0 and "one of check, download, features" in listing.output


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--study", "nope"], "Invalid value for --study: must be one of fedavg"),
    (["stage", "nope"], "Invalid value for NAME: must be one of check, download"),
])
def test_bad_names_are_refused_with_the_choices(argv: list[str], message: str) -> None:
    result = runner.invoke(cli.app, argv)
    assert result.exit_code == 2 and message in " ".join(result.output.split())


def test_deploy_without_a_server_says_what_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = runner.invoke(cli.app, ["deploy"])
    assert result.exit_code == 2 and "prefect server start" in result.output


def test_a_failing_stage_gives_its_exit_code(tmp_path: Path) -> None:
    result = _fedaudio("stage", "partition", "--params", str(tmp_path / "missing.yaml"), cwd=tmp_path,
                       env={**os.environ, "FEDAUDIO_SHARED_SERVER": "0"})
    assert result.returncode == 2 and "not found" in result.stderr
