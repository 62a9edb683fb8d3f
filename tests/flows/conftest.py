"""Flow tests run under one Prefect test harness per session; subprocesses share its server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
PROJECT_FILES = ["fedcore", "tasks", "flows", "plugins", "dvc.yaml", "params.yaml", "prefect.yaml", ".dvcignore",
                 ".gitignore"]


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A Prefect test harness; yields its API URL so stage subprocesses use the same server."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        server = SubprocessASGIServer()
        yield server.api_url


def tiny_params(mirror: Path, **overrides: dict[str, object]) -> dict[str, object]:
    """Params of a small but real run: 180 FSDD clips, 3 clients, 2 rounds."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["download"]["mirror"] = str(mirror)
    params["partition"].update(num_clients=3, min_samples=5)
    params["federation"].update(rounds=2, batch_size=16)
    params["mlflow"]["tracking_uri"] = "sqlite:///mlflow.db"
    for section, values in overrides.items():
        params[section].update(values)
    return params


@pytest.fixture(scope="session")
def small_mirror(tmp_path_factory: pytest.TempPathFactory, fsdd_small_zip: Path) -> Path:
    """A mirror folder holding the small real FSDD archive under the name of the real one."""
    mirror = tmp_path_factory.mktemp("mirror")
    (mirror / "fsdd").mkdir()
    shutil.copy(fsdd_small_zip, mirror / "fsdd" / fsdd_small_zip.name)
    return mirror


def make_project(target: Path, params: dict[str, object]) -> Path:
    """A fresh git + DVC project holding this repository's pipeline code and the given params."""
    target.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(source, target / name)
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], target)
    run([dvc_executable(), "init", "-q"], target)
    run(["git", "add", "-A"], target)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], target)
    return target


def dvc_executable() -> str:
    return str(Path(sys.executable).with_name("dvc"))


def stage_env(api_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("FEDAUDIO_MIRROR", None)  # the tiny params name their own mirror
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t"})
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=env or stage_env(), capture_output=True, text=True,
                            timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The processes of ``processes`` still running (zombies count as gone)."""
    running = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            continue
    return running


@pytest.fixture()
def started() -> Iterator[list[psutil.Process]]:
    """Processes a test started; any still running at the end are killed (so a failure leaves none)."""
    processes: list[psutil.Process] = []
    yield processes
    for p in alive(processes):
        p.kill()
