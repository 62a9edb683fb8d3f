"""The README stays short and every command in it is run: by a test (long ones on a tiny config) or by CI.

Each command of the README's fenced ``bash`` blocks, and each ``python`` block, must be listed in
:data:`EXERCISED` with the tests that run it and a fragment of the command that each of those tests' source
holds; a command added to the README without a test fails here, as does a listed test that no longer exists or no
longer runs the command. The cheap commands (the MLflow UI, the Prefect server and its work pool) run here.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import stop_group

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 250
E2E = "tests/flows/test_pipeline_e2e.py"

#: README command -> [(test file, test or fixture function, fragment its source must hold)].
EXERCISED: dict[str, list[tuple[str, str, str]]] = {
    "FEDAUDIO_MIRROR=../shared/datasets make run": [
        ("tests/test_readme.py", "test_make_run_and_test_set_up_first", "run"),
        (E2E, "project", "flows.pipeline")],  # make run's recipe, on a tiny project
    "make test": [(".ci/run", "", "make test")],
    "source .venv/bin/activate": [("tests/test_readme.py", "test_the_environment_has_its_commands", "activate")],
    "dvc repro studies/fassl/dvc.yaml": [
        ("tests/flows/test_studies.py", "study_project", '"repro", f"studies/{RUN_STUDY}/dvc.yaml"')],
    "python -m flows.pipeline --study fassl -S federation.rounds=8": [
        ("tests/flows/test_studies.py", "test_the_pipeline_flow_runs_a_study_with_an_override", '"--study"')],
    "dvc repro": [(E2E, "test_second_repro_does_nothing", '"repro"')],
    "dvc exp run -S federation.rounds=5 -S partition.alpha=0.1": [
        (E2E, "test_exp_run_with_a_changed_param", '"exp", "run", "-S"')],
    "dvc exp show --only-changed": [(E2E, "test_exp_run_with_a_changed_param", '"--only-changed"')],
    "prefect server start --host 127.0.0.1": [
        ("tests/test_readme.py", "test_the_prefect_server_and_work_pool_commands", "PREFECT_SERVER")],
    "export PREFECT_API_URL=http://127.0.0.1:4200/api": [
        ("tests/test_readme.py", "test_the_prefect_server_and_work_pool_commands", "PREFECT_API_URL")],
    "prefect work-pool create fedaudio-local --type process": [
        ("tests/test_readme.py", "test_the_prefect_server_and_work_pool_commands", "WORK_POOL")],
    "prefect deploy --all": [("tests/flows/test_deployment.py", "deployed", '"deploy", "--all"')],
    "prefect worker start --pool fedaudio-local": [
        ("tests/flows/test_deployment.py", "deployed", '"worker", "start"')],
    "prefect deployment run pipeline/fedaudio-pipeline --param 'run={\"rounds\": 3}'": [
        ("tests/flows/test_deployment.py", "run_and_wait", '"deployment", "run"')],
    "fedaudio ui": [("tests/test_readme.py", "test_the_mlflow_ui_command_serves_the_store", "MLFLOW_UI")],
    "python: load a model": [(E2E, "test_the_readme_python_block_loads_the_final_model", "python_blocks")],
}


def readme_text() -> str:
    return README.read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", readme_text(), flags=re.M | re.S)


def bash_commands() -> list[str]:
    """Every command of the README's ``bash`` blocks: comments and a trailing ``&`` dropped, continuations joined."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip().removesuffix("&").strip()
            if command and not command.startswith("#"):
                commands.append(re.sub(r"\s+", " ", command))
    return commands


def python_blocks() -> list[str]:
    """The README's ``python`` blocks, as a user would paste them."""
    return _blocks("python")


def _function_source(path: Path, name: str) -> str:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return ast.get_source_segment(path.read_text(), node) or ""
    raise AssertionError(f"{path.relative_to(ROOT)} has no function {name!r}")


def test_readme_fits_a_page_with_contents() -> None:
    lines = readme_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; at most {MAX_LINES} (move detail to docs/)"
    assert any(line.startswith("**Contents:**") for line in lines[:20])
    for anchor in re.findall(r"\]\(#([a-z0-9-]+)\)", readme_text()):
        headings = [re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                    for h in re.findall(r"^#+ (.+)$", readme_text(), flags=re.M)]
        assert anchor in headings, f"README link #{anchor} names no heading"


def test_readme_links_point_at_files() -> None:
    for target in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", readme_text()):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_every_readme_command_is_exercised() -> None:
    commands = bash_commands() + (["python: load a model"] if python_blocks() else [])
    missing = [c for c in commands if c not in EXERCISED]
    assert not missing, f"README commands that no test runs (add them to EXERCISED with their test): {missing}"
    unused = sorted(set(EXERCISED) - set(commands))
    assert not unused, f"EXERCISED lists commands no longer in the README: {unused}"
    assert len(python_blocks()) == 1


@pytest.mark.parametrize("command", sorted(EXERCISED))
def test_the_listed_tests_exist_and_run_the_command(command: str) -> None:
    for file, function, fragment in EXERCISED[command]:
        path = ROOT / file
        source = _function_source(path, function) if function else path.read_text()
        assert fragment in source, (f"{file}::{function or '(file)'} does not hold {fragment!r}: does it still run "
                                    f"{command!r}?")


def test_make_run_and_test_set_up_first(tmp_path: Path) -> None:
    """``make run`` and ``make test`` run the set-up first when it is missing or older than the lock, else not."""
    for name in ["Makefile", "requirements.lock", "pyproject.toml"]:
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_bytes((ROOT / "scripts" / "setup.sh").read_bytes())

    def dry(target: str) -> str:
        return subprocess.run(["make", "-n", target], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    for target, recipe in [("run", "-m flows.pipeline"), ("test", "-m pytest")]:
        assert "bash scripts/setup.sh" in dry(target) and recipe in dry(target), dry(target)  # a fresh machine
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").touch()
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").touch()
    (tmp_path / ".venv" / ".fedaudio-setup").touch()
    for target in ["run", "test"]:
        assert "setup.sh" not in dry(target), dry(target)  # up to date: straight to the command
    future = time.time() + 60
    os.utime(tmp_path / "requirements.lock", (future, future))
    assert "bash scripts/setup.sh" in dry("test")  # a newer lock: set up again
    os.utime(tmp_path / "requirements.lock", (future - 120, future - 120))
    (tmp_path / ".dvc" / "config").unlink()
    assert "bash scripts/setup.sh" in dry("run")  # the DVC repository is gone: set up again


def test_the_environment_has_its_commands() -> None:
    """What ``source .venv/bin/activate`` puts on PATH: the environment's python, dvc, prefect, mlflow, fedaudio."""
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "activate").is_file()
    for tool in ["dvc", "prefect", "mlflow", "fedaudio"]:
        assert (bin_dir / tool).is_file(), tool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, deadline: float) -> str:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _readme(prefix: str) -> list[str]:
    (command,) = [c for c in bash_commands() if prefix in c]
    return shlex.split(command)


@pytest.mark.integration
def test_the_mlflow_ui_command_serves_the_store(tmp_path: Path) -> None:
    MLFLOW_UI = _readme("fedaudio ui")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("MLFLOW_TRACKING_URI", None)  # set by earlier tests' mlflow.set_tracking_uri; it would win
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")  # names the store: sqlite:///mlflow.db
    port = _free_port()
    process = subprocess.Popen([*MLFLOW_UI, "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert process.stdout is not None
        # The address it prints opens MLflow's UI in model-training mode (no experiment yet: the list).
        assert "model-training mode" in process.stdout.readline()
        assert f"http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning" in process.stdout.readline()
        assert _get(f"http://127.0.0.1:{port}/health", time.monotonic() + 120).strip() == "OK"
        search = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"
        experiments = _get(search, time.monotonic() + 30)
        assert '"Default"' in experiments
        assert (tmp_path / "mlflow.db").is_file()  # the store the README names, in the folder it runs from
    finally:
        stop_group(process)


@pytest.mark.integration
def test_the_prefect_server_and_work_pool_commands(tmp_path: Path) -> None:
    PREFECT_SERVER = _readme("prefect server start")
    WORK_POOL = _readme("prefect work-pool create")
    port = _free_port()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true")
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([*PREFECT_SERVER, "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        (export,) = [c for c in bash_commands() if c.startswith("export PREFECT_API_URL=")]
        api = export.split("=", 1)[1].replace(":4200", f":{port}")  # the README's URL, on this test's port
        env["PREFECT_API_URL"] = api
        assert "true" in _get(f"{api}/health", time.monotonic() + 180)
        created = subprocess.run(WORK_POOL, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert created.returncode == 0, created.stdout + created.stderr
        shown = subprocess.run(["prefect", "work-pool", "inspect", WORK_POOL[3]], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
        assert "type='process'" in shown.stdout.replace('"', "'"), shown.stdout + shown.stderr
    finally:
        stop_group(server)
