"""One Prefect server for the stages of a ``dvc repro`` or ``dvc exp run`` when none is configured.

Without ``PREFECT_API_URL`` every Prefect process starts a temporary API server of its own: 7-14 s per DVC stage,
most of a small experiment. Instead, a stage calls :func:`attach` first. Under a lock in ``PREFECT_HOME`` it reads
:data:`STATE_NAME`; when that server answers ``/api/health`` the stage uses it (``PREFECT_API_URL``), otherwise it
starts ``python -m tasks.server`` in a session of its own, the *keeper*, which starts Prefect's temporary server,
writes the state file, and waits. Each stage holds a lease (a file named by its process id in
:data:`LEASES_NAME`) while it runs; the keeper stops the server and exits once no lease has been alive for
``FEDAUDIO_SERVER_IDLE_S`` seconds (default :data:`IDLE_S`), so the server outlives one stage, not the work.

The stages' runs then all show up in one place (``prefect server start`` shows them too if pointed at the same
``PREFECT_HOME``). ``FEDAUDIO_SHARED_SERVER=0`` turns this off: each stage starts its own temporary server, as
Prefect does by default. A configured ``PREFECT_API_URL`` is always used as it is.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

STATE_NAME = "fedaudio-server.json"
"""File in ``PREFECT_HOME`` naming the shared server (``url``) and its keeper (``pid``)."""
LEASES_NAME = "fedaudio-server.leases"
"""Folder in ``PREFECT_HOME`` holding one file per stage using the shared server, named by its process id."""
LOCK_NAME = "fedaudio-server.lock"
IDLE_S = 60.0
"""Seconds the keeper waits with no stage alive before it stops the server (``FEDAUDIO_SERVER_IDLE_S``)."""
START_TIMEOUT_S = 180.0
"""Seconds a stage waits for a keeper it started to report its server."""
KEEPER_MARK = "tasks.server"
"""In the keeper's command line: the stage watchdog (``flows.stage.watch``) spares it and its server."""


def home() -> Path:
    """Prefect's home folder (``PREFECT_HOME``, else ``~/.prefect``), created if missing."""
    folder = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def enabled() -> bool:
    """Whether a stage should use the shared server: no server configured, and sharing not turned off."""
    return not os.environ.get("PREFECT_API_URL") and os.environ.get("FEDAUDIO_SHARED_SERVER", "1") != "0"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the Prefect API at ``url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


def _state(folder: Path) -> dict[str, object]:
    """The state file: ``{"url", "pid"}`` once the server is up, ``{"starting": keeper pid}`` before; {} if none."""
    try:
        state = json.loads((folder / STATE_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _lease(folder: Path, pid: int) -> Path:
    leases = folder / LEASES_NAME
    leases.mkdir(exist_ok=True)
    path = leases / str(pid)
    path.touch()
    return path


def attach() -> str | None:
    """Use the shared server from now on (``PREFECT_API_URL``), starting its keeper if none runs; return its URL.

    Returns None (nothing changed) when :func:`enabled` is false. The lease taken for this process is given back
    at exit; a process killed leaves a lease the keeper finds dead.
    """
    if not enabled():
        return None
    folder, deadline = home(), time.monotonic() + START_TIMEOUT_S
    while True:
        with _locked(folder):
            state = _state(folder)
            url = state.get("url")
            if isinstance(url, str) and healthy(url):
                lease = _lease(folder, os.getpid())
                atexit.register(_release, lease)
                os.environ["PREFECT_API_URL"] = url
                _refresh_prefect_settings()
                return url
            starting = state.get("starting")
            if not (isinstance(starting, int) and _alive(starting)):  # none, or one that died: a new keeper
                _lease(folder, os.getpid())  # the keeper must not find itself idle before this stage attaches
                pid = _start_keeper(folder)
                (folder / STATE_NAME).write_text(json.dumps({"starting": pid}))
        if time.monotonic() > deadline:
            raise RuntimeError(f"tasks.server: the shared Prefect server did not start within {START_TIMEOUT_S:g} s "
                               f"(its log: {folder / 'fedaudio-server.log'}); set PREFECT_API_URL to a running "
                               "server, or FEDAUDIO_SHARED_SERVER=0")
        time.sleep(0.2)


def _refresh_prefect_settings() -> None:
    """Make an already imported Prefect read ``PREFECT_API_URL`` again.

    Prefect reads its settings once, when it is imported; a process that imported it before :func:`attach` would
    otherwise start a temporary server of its own at its first flow run, and the shared one would go unused.
    """
    context = sys.modules.get("prefect.context")
    if context is not None:
        context.refresh_global_settings_context()


def _release(lease: Path) -> None:
    lease.unlink(missing_ok=True)


def _start_keeper(folder: Path) -> int:
    with open(folder / "fedaudio-server.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", KEEPER_MARK], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True).pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not a stage at work
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _live_leases(folder: Path) -> int:
    count = 0
    for lease in (folder / LEASES_NAME).glob("*"):
        if lease.name.isdigit() and _alive(int(lease.name)):
            count += 1
        else:
            lease.unlink(missing_ok=True)
    return count


SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
"""What Prefect's own temporary server runs with (``SubprocessASGIServer``): no UI, ephemeral services."""
SERVER_APP = "prefect.server.api.server:create_app"
"""The ASGI factory ``prefect server start`` and Prefect's temporary server both run under uvicorn."""
UVICORN_STARTUP_FAILURE = 3
"""uvicorn's exit status when it cannot start (e.g. its port was taken meanwhile): try another port."""


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(timeout_s: float = START_TIMEOUT_S, tries: int = 5) -> tuple[subprocess.Popen[bytes], str]:
    """Start Prefect's API server as Prefect's temporary server does; return its process and API URL once healthy.

    The same command (``python -m uvicorn --factory`` :data:`SERVER_APP`) and environment (:data:`SERVER_ENV`), but
    the keeper never imports Prefect for it: importing Prefect's server module held about 170 MB in the keeper for
    its whole life and took seconds before the server could start.
    """
    spec = importlib.util.find_spec("prefect")  # finds the package without importing it
    if spec is None or spec.origin is None:
        raise RuntimeError("tasks.server: prefect is not installed")
    app_dir = str(Path(spec.origin).parent.parent)
    deadline = time.monotonic() + timeout_s
    for _ in range(tries):
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        process = subprocess.Popen([sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory", SERVER_APP,
                                    "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
                                    "--lifespan", "on"], env={**os.environ, **SERVER_ENV}, stdin=subprocess.DEVNULL)
        while process.poll() is None and time.monotonic() < deadline:
            if healthy(url, timeout_s=1.0):
                return process, url
            time.sleep(0.1)
        if process.poll() is None:  # timed out
            stop_server(process)
            break
        if process.returncode != UVICORN_STARTUP_FAILURE:
            raise RuntimeError(f"tasks.server: Prefect's server exited with status {process.returncode} at start")
    raise RuntimeError(f"tasks.server: Prefect's server did not answer within {timeout_s:g} s")


def stop_server(process: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """Terminate the server, killing it if it has not exited within ``timeout_s``."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def keep(idle_s: float, poll_s: float = 0.5) -> int:
    """The keeper: start Prefect's temporary server, report it, stop it after ``idle_s`` without a live lease."""
    for key, value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}.items():
        os.environ.setdefault(key, value)
    os.environ.pop("PREFECT_API_URL", None)
    folder = home()
    server, url = start_server()
    with _locked(folder):
        (folder / STATE_NAME).write_text(json.dumps({"url": url, "pid": os.getpid()}))
    print(f"tasks.server: shared Prefect server at {url} (keeper {os.getpid()})", flush=True)
    idle_since: float | None = None
    try:
        while server.poll() is None:
            time.sleep(poll_s)
            with _locked(folder):
                if _live_leases(folder):
                    idle_since = None
                    continue
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= idle_s:
                    (folder / STATE_NAME).unlink(missing_ok=True)  # under the lock: no stage attaches after this
                    break
    finally:
        stop_server(server)
    print(f"tasks.server: stopped after {idle_s:g} s without a stage", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(keep(float(os.environ.get("FEDAUDIO_SERVER_IDLE_S", IDLE_S))))
