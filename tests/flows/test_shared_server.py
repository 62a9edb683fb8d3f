"""The Prefect server the stages share when none is configured (tasks.server): one keeper, stopped when idle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tasks import server

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGE = """
import os, sys
from prefect import flow
from tasks import server
url = server.attach()
@flow(name="tiny")
def tiny() -> str:  # the server this flow run reports to (Prefect was imported before attach)
    from prefect.context import get_run_context
    return str(get_run_context().client.api_url).rstrip("/")
print(url, tiny(), os.getpid(), flush=True)
"""


def _env(home: Path, idle_s: float = 3) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), FEDAUDIO_SHARED_SERVER="1", FEDAUDIO_SERVER_IDLE_S=f"{idle_s:g}",
               PYTHONPATH=str(REPO_ROOT))
    return env


def _stage(home: Path, idle_s: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", STAGE], env=_env(home, idle_s), cwd=home.parent, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def test_stages_share_one_server_which_waits_for_live_stages_and_stops_once_idle(tmp_path: Path) -> None:
    """Two stages started together and one after them use one server (one keeper); the keeper keeps it while a
    stage holds it, past the idle time, and not for a killed one: then it stops the server and exits."""
    # idle_s: more than a stage's start-up on a busy machine (two test workers), so the server waits between stages
    home, idle_s = tmp_path / "prefect", 30.0
    first = [_stage(home, idle_s), _stage(home, idle_s)]
    outputs = [process.communicate(timeout=300) for process in first]
    assert [process.returncode for process in first] == [0, 0], [err[-2000:] for _, err in outputs]
    later = _stage(home, idle_s)
    out, err = later.communicate(timeout=120)
    assert later.returncode == 0, err[-2000:]
    urls = {word for line, _ in [*outputs, (out, "")] for word in line.split()[:2]}
    # one URL: attach's, and the one every flow run reported to
    assert len(urls) == 1 and next(iter(urls)).startswith("http://127.0.0.1:")
    assert (home / "fedaudio-server.log").read_text().count("shared Prefect server at") == 1

    holder = subprocess.Popen([sys.executable, "-c", "from tasks import server; import time; "
                               "print(server.attach(), flush=True); time.sleep(600)"],
                              env=_env(home, idle_s), cwd=tmp_path, text=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        url = holder.stdout.readline().strip()
        assert {url} == urls
        state = json.loads((home / server.STATE_NAME).read_text())
        keeper = psutil.Process(state["pid"])
        processes = [keeper.pid, *(child.pid for child in keeper.children(recursive=True))]
        time.sleep(idle_s + 2)  # a live stage's lease keeps the server past the idle time
        assert server.healthy(url) and keeper.is_running()
        holder.kill()  # a killed stage's lease does not
        holder.wait()
        assert not _wait_gone(processes, timeout_s=idle_s + 30)
    finally:
        holder.kill()
    assert not (home / server.STATE_NAME).exists() and not server.healthy(url, timeout_s=1)
    assert f"stopped after {idle_s:g} s without a stage" in (home / "fedaudio-server.log").read_text()


def test_nothing_is_shared_when_turned_off_or_a_server_is_configured(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("FEDAUDIO_SHARED_SERVER", "0")
    assert server.attach() is None
    monkeypatch.setenv("FEDAUDIO_SHARED_SERVER", "1")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert server.attach() is None
    assert not (tmp_path / server.STATE_NAME).exists()


def test_the_keeper_runs_prefects_server_without_importing_prefect(tmp_path: Path) -> None:
    # Prefect's server module held ~170 MB in the keeper for its whole life; the keeper only runs its command.
    code = ("import sys; from tasks import server; process, url = server.start_server(); "
            "answered = server.healthy(url); server.stop_server(process); "
            "print(answered, 'prefect' in sys.modules, process.poll() is not None)")
    probe = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path / "home"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, check=True)
    assert probe.stdout.split() == ["True", "False", "True"], probe.stderr
