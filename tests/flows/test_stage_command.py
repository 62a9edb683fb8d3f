"""A stage's command line (flows.stage.command): fast help that names the defaults, DVC's commands, clear errors."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows import cli, stage

ROOT = Path(__file__).resolve().parents[2]
MODULES = [*cli.STAGES.values(), cli.PIPELINE]
HEAVY = ("prefect", "mlflow", "torch", "numpy", "dvc", "tasks")
"""What a stage module must not import before its stage runs (a package or any of its modules)."""


def _help(module: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert importlib.import_module(module).main(["--help"]) == 0
    return capsys.readouterr().out


def _heavy(names: object) -> list[str]:
    return sorted({n for n in names if isinstance(n, str) and n.split(".")[0] in HEAVY})  # type: ignore[attr-defined]


def test_importing_a_stage_module_imports_neither_prefect_nor_torch() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", f"import importlib, sys; [importlib.import_module(m) for m in {MODULES!r}]; "
                               "print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True, cwd=ROOT)
    assert _heavy(probe.stdout.split()) == []


def test_help_answers_without_importing_the_stage() -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.federate", "--help"],
                            capture_output=True, text=True, check=False, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: python -m flows.federate [OPTIONS]")  # the program as typed
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert "typer" in imported and _heavy(imported) == []


@pytest.mark.parametrize("module", MODULES)
def test_help_gives_every_option_its_help_and_default(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(module, capsys)
    assert text.startswith(f"Usage: python -m {module} ")
    assert "``" not in text and not re.search(r":[a-z]+:`", text)  # no reST marks
    options = text.split("\nOptions:\n", 1)[1]
    rows = re.findall(r"^  (-[^ ]*(?:, -[^ ]*)*)(?: [A-Z][A-Z=:]*)?(?:  +(.*))?$", options, re.MULTILINE)
    assert rows, text
    for names, help_text in rows:
        assert help_text and not help_text.startswith("["), f"{module}: {names} has no help"
    if module != "flows.headline":  # every option of headline is required
        assert "--params FILE" in options or module == "flows.pipeline"
        assert "[default: " in options


def test_help_names_the_real_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(_help("flows.federate", capsys).split())
    for option, default in [("--params FILE", "params.yaml"), ("--features DIR", "data/features"),
                            ("--partition FILE", "data/partition/partition.json"),
                            ("--model FILE", "models/global.safetensors"), ("--downstream DIR", "data/downstream")]:
        assert re.search(f"{option} .*?\\[default: {re.escape(default)}\\]", text), option
    assert "[default: fedavg]" in " ".join(_help("flows.pipeline", capsys).split())


def _dvc_commands() -> list[list[str]]:
    """Every ``python -m flows.<module> ...`` of the committed dvc.yaml files, as argv (variables filled in)."""
    commands = []
    for dvc_file in [ROOT / "dvc.yaml", *sorted(ROOT.glob("studies/*/dvc.yaml"))]:
        for spec in yaml.safe_load(dvc_file.read_text())["stages"].values():
            for cmd in spec["cmd"] if isinstance(spec["cmd"], list) else [spec["cmd"]]:
                argv = shlex.split(re.sub(r"\$\{[^}]+\}", "x", cmd))
                if argv[:2] == ["python", "-m"] and argv[2].startswith("flows."):
                    commands.append(argv[2:])
    return commands


def test_every_dvc_command_line_parses() -> None:
    commands = _dvc_commands()
    assert {argv[0] for argv in commands} >= {"flows.check", "flows.federate", "flows.select", "flows.headline"}
    for module, *argv in commands:
        function = importlib.import_module(module)._main
        options = stage.parse(function, "", argv, module)
        assert isinstance(options, dict), (module, argv)
        if "--params" in argv:
            assert options["params"] == Path(argv[argv.index("--params") + 1])


@pytest.mark.parametrize(("module", "argv", "message"), [
    ("flows.pipeline", ["--study", "nope"], "Error: Invalid value for --study: must be one of fedavg, personalised, "
                                            "fassl, modalitymirror, earlyexit. Got 'nope'."),
    ("flows.select", ["--out", "sel"], "Error: Invalid value for --run-id / --metrics: exactly one of them must be "
                                       "given. Got neither."),
    ("flows.modality", ["bogus"], "Error: Invalid value for 'COMMAND'"),
    ("flows.federate", ["--featurs", "x"], "Usage: python -m flows.federate [OPTIONS] Try 'python -m flows.federate "
                                           "-h' for help. Error: No such option: --featurs"),
    ("flows.features", ["--raw"], "Error: Option '--raw' requires an argument."),
    ("flows.headline", ["--study", "s", "--out", "h.json"], "Error: Missing argument 'NAME=FILE:KEY'."),
])
def test_a_bad_command_line_gives_one_clear_error(module: str, argv: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert importlib.import_module(module).main(argv) == 2
    err = capsys.readouterr().err
    assert " ".join(err.split()).count("Error:") == 1 and message in " ".join(err.split()), err
    assert "Traceback" not in err


def test_fedaudio_stage_names_itself_in_help_and_errors() -> None:
    runner = CliRunner()
    result = runner.invoke(cli.app, ["stage", "features", "--help"])
    assert result.exit_code == 0 and result.output.startswith("Usage: fedaudio stage features [OPTIONS]")
    result = runner.invoke(cli.app, ["stage", "features", "--rw", "x"])
    assert result.exit_code == 2 and "Try 'fedaudio stage features -h' for help." in result.output


@pytest.mark.parametrize(("module", "attribute", "name"), [
    ("flows.download", "download", "download"), ("flows.features", "features", "features"),
    ("flows.partition", "partition", "partition"), ("flows.poison", "poison", "poison"),
    ("flows.federate", "federated_training", "federate"), ("flows.select", "select", "select"),
    ("flows.earlyexit", "earlyexit_training", "earlyexit"), ("flows.av", "pair_av", "av"),
    ("flows.modality", "modality_training", "modality"), ("flows.distill", "distillation", "distill"),
    ("flows.pipeline", "pipeline", "pipeline"), ("flows.pipeline", "repro_stage", "dvc-repro"),
])
def test_the_flows_are_built_on_first_use_with_their_names(module: str, attribute: str, name: str) -> None:
    from prefect import Flow, Task

    built = getattr(importlib.import_module(module), attribute)
    assert isinstance(built, Flow | Task) and built.name == name
    assert getattr(importlib.import_module(module), attribute) is built  # built once
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        importlib.import_module(module).nope  # noqa: B018


def test_a_stage_command_needs_the_params_option() -> None:
    def no_params(out: Path = Path("x")) -> None: ...

    with pytest.raises(TypeError, match="must take 'params'"):
        stage.command("", no_params)


def test_plain_drops_rest_marks_and_keeps_a_command_line_whole() -> None:
    text = stage.plain("Run ``python -m flows.x`` with :func:`fedcore.run` (a *study*).\n\n"
                       "``python -m flows.x --out DIR --params FILE``\n")
    assert text == ("Run python -m flows.x with fedcore.run (a study).\n\n"
                    "\b\npython -m flows.x --out DIR --params FILE")


def test_fedaudio_run_hands_the_pipeline_a_command_line_it_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows import pipeline

    calls: list[list[str]] = []
    monkeypatch.setattr(cli, "_main_of", lambda module, argv, prog_name=None: calls.append(argv) or 0)
    result = CliRunner().invoke(cli.app, ["run", "--study", "fassl", "-S", "federation.rounds=2", "--stage",
                                          "features", "--stage", "federate", "--force"])
    assert result.exit_code == 0, result.output
    options = stage.parse(pipeline._main, "", calls[0], "python -m flows.pipeline")
    assert options == {"study": "fassl", "overrides": ["federation.rounds=2"], "stages": ["features", "federate"],
                       "force": True}


def test_a_stage_caps_mallocs_arenas_unless_the_environment_says_otherwise() -> None:
    code = "from flows.stage import limit_malloc_arenas; print(limit_malloc_arenas())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    capped = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert capped.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False")
    kept = subprocess.run([sys.executable, "-c", code], env={**env, "MALLOC_ARENA_MAX": "4"}, capture_output=True,
                          text=True, check=True)
    assert kept.stdout.strip() == "False"
