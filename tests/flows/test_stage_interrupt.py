"""An interrupted stage exits within seconds and leaves nothing running (Ctrl-C during ``dvc repro``).

A terminal sends Ctrl-C to its whole foreground process group: each test starts a small stage in a process group
of its own, with no ``PREFECT_API_URL`` (so Prefect starts its temporary server), and signals the whole group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows import stage
from tests.flows.conftest import alive as _alive

pytestmark = pytest.mark.integration

GONE_WITHIN_S = 20.0
"""Bound on the time from the signal to the end of every process of the stage (it took minutes before)."""

INTERRUPTED_STAGE = r'''"""A flow that naps in a task; with --stuck, the task swallows the interrupt and naps on."""

import argparse
import time
from pathlib import Path

from prefect import flow, task

from flows import stage

stage.INTERRUPT_GRACE_S = 3.0


@task
def nap(marker: str, stuck: bool) -> None:
    Path(marker).touch()
    try:
        time.sleep(600)
    except BaseException:
        if stuck:  # as a stage whose server is gone: Prefect's client retries for minutes
            time.sleep(600)
        raise


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--marker", required=True)
    p.add_argument("--stuck", action="store_true")


def _main(args: argparse.Namespace) -> None:
    @flow(name="interrupted")
    def interrupted() -> None:
        nap(args.marker, args.stuck)

    interrupted()


if __name__ == "__main__":
    raise SystemExit(stage.entry(__doc__, _arguments, _main))
'''


def _as_from_a_terminal() -> None:
    """SIGINT at its default, as a terminal's foreground job has it (a background shell, e.g. CI's, ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(folder: Path, number: signal.Signals, started: list[psutil.Process],
               *extra: str) -> tuple[subprocess.Popen[bytes], int, list[psutil.Process], float]:
    """Start the stage in a new process group, wait for its task, signal the group. Return the stage, the process
    id of its temporary server, its tree of processes and the time from the signal until every one had ended (or
    ``GONE_WITHIN_S`` passed)."""
    (folder / "interrupted.py").write_text(INTERRUPTED_STAGE)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(folder / "prefect"), "PREFECT_LOGGING_LEVEL": "INFO",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                "PYTHONPATH": os.pathsep.join([str(Path(stage.__file__).parents[1]), env.get("PYTHONPATH", "")])})
    with open(folder / "log.txt", "wb") as log:
        process = subprocess.Popen([sys.executable, "interrupted.py", "--marker", "marker", *extra], cwd=folder,
                                   env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_as_from_a_terminal)
    started.append(psutil.Process(process.pid))
    deadline = time.monotonic() + 150
    while not (folder / "marker").exists():
        assert process.poll() is None, (folder / "log.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "stage not running after 150 s"
        time.sleep(0.2)
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    started.extend(tree)
    servers = [p.pid for p in tree if "uvicorn" in p.cmdline()]
    assert len(servers) == 1, [p.cmdline() for p in tree]
    assert os.getpgid(servers[0]) != process.pid  # out of the group the terminal signals
    os.killpg(process.pid, number)
    start = time.monotonic()
    while _alive(tree) and time.monotonic() - start < GONE_WITHIN_S:
        time.sleep(0.1)
    return process, servers[0], tree, time.monotonic() - start


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_stage_records_its_run_and_exits_promptly(
    number: signal.Signals, tmp_path: Path, started: list[psutil.Process]
) -> None:
    """The signal reaches the stage but not its temporary server (a session of its own): the flow run is
    recorded as Crashed, then the stage and its server end within seconds (minutes before: the server died with
    the group and Prefect's client retried it)."""
    process, _, tree, took = _interrupt(tmp_path, number, started)
    log = (tmp_path / "log.txt").read_text()
    left = _alive(tree)
    assert not left, f"left running {took:.1f} s after {number.name}: {[p.cmdline() for p in left]}\n{log[-3000:]}"
    cause = "an interrupt signal" if number == signal.SIGINT else "a termination signal"
    assert f"Flow run '{_flow_run_name(log)}' - Finished in state Crashed('Execution was aborted by {cause}.')" in log
    assert "Connection refused" not in log and "ending now" not in log, log[-3000:]
    assert process.wait(timeout=5) == -number  # ended by the signal, as before


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stage_stuck_after_an_interrupt_ends_itself_and_the_watchdog_cleans_up(
    number: signal.Signals, tmp_path: Path, started: list[psutil.Process]
) -> None:
    """A stage that does not exit after the signal (here its task swallows it) ends itself
    ``INTERRUPT_GRACE_S`` (3 s here) later, through Prefect's own SIGTERM handler too; the watchdog then ends
    the temporary server it left."""
    process, server, tree, took = _interrupt(tmp_path, number, started, "--stuck")
    log = (tmp_path / "log.txt").read_text()
    left = _alive(tree)
    assert not left, f"left running {took:.1f} s after {number.name}: {[p.cmdline() for p in left]}\n{log[-3000:]}"
    assert took >= 3.0
    assert process.wait(timeout=5) == 128 + number
    assert f"stage: still running 3 s after {number.name}; ending now (process {process.pid})" in log, log[-3000:]
    assert f"stage watchdog: process {process.pid} ended without cleaning up" in log, log[-3000:]
    assert f"({server})" in log.rsplit("ended without cleaning up", 1)[1]


def _flow_run_name(log: str) -> str:
    """Name of the flow run the stage's log begins."""
    line = next(line for line in log.splitlines() if "Beginning flow run" in line)
    return line.split("Beginning flow run '", 1)[1].split("'", 1)[0]
