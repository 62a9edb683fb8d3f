"""Prefect or none (tasks.orchestration): the switch, tasks that run either way, the thread executor's retry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tasks.rounds
from fedcore.errors import ConfigError
from tasks.orchestration import PREFECT_ENV, Task, orchestrated, publish_markdown, publish_table, task
from tasks.rounds import ThreadExecutor

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("value", "expected"), [(None, True), ("", True), ("on", True), ("1", True),
                                                 ("off", False), ("OFF", False), ("0", False), ("false", False)])
def test_the_switch_reads_the_environment(value: str | None, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if value is None:
        monkeypatch.delenv(PREFECT_ENV, raising=False)
    else:
        monkeypatch.setenv(PREFECT_ENV, value)
    assert orchestrated() is expected


def test_an_unknown_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PREFECT_ENV, "sometimes")
    with pytest.raises(ConfigError, match="FEDAUDIO_PREFECT='sometimes'.*'off'"):
        orchestrated()


def test_without_prefect_a_task_is_its_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PREFECT_ENV, "off")

    @task(name="add")
    def add(a: int, b: int = 1) -> int:
        """Add."""
        return a + b

    assert isinstance(add, Task) and add.__name__ == "add" and add.__doc__ == "Add."
    assert add(2, b=3) == 5
    assert add.with_options(name="other", retries=3) is add
    with pytest.raises(RuntimeError, match="submit needs Prefect"):
        add.submit(1)
    publish_table([{"a": 1}], key="t")  # no flow run: nothing to publish, no error
    publish_markdown("# m", key="m")


def test_with_prefect_a_task_becomes_a_prefect_task_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import Task as PrefectTask
    from prefect.cache_policies import NO_CACHE

    monkeypatch.delenv(PREFECT_ENV, raising=False)

    @task(name="add", retries=2)
    def add(a: int) -> int:
        return a + 1

    built = add.prefect()
    assert isinstance(built, PrefectTask) and built.name == "add" and built.retries == 2
    assert built.cache_policy is NO_CACHE and add.prefect() is built
    assert add.with_options(name="x").name == "x"


def test_importing_the_task_modules_does_not_import_prefect() -> None:
    code = ("import sys; import tasks.data, tasks.federate, tasks.rounds, tasks.progress, flows.runners, "
            "flows.federate; assert 'prefect' not in sys.modules, sorted(m for m in sys.modules if 'prefect' in m)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_the_thread_executor_retries_once_then_gives_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, int] = {}

    def run_job(job: Any) -> Any:
        calls[job] = calls.get(job, 0) + 1
        if job == "flaky" and calls[job] == 1:
            raise OSError("once")
        if job == "broken":
            raise RuntimeError(f"attempt {calls[job]}")
        return job.upper()

    monkeypatch.setattr(tasks.rounds, "run_job", run_job)
    executor = ThreadExecutor(max_workers=2)
    futures = {job: executor.submit(job) for job in ("ok", "flaky", "broken")}
    assert futures["ok"].result() == "OK" and futures["flaky"].result() == "FLAKY"
    with pytest.raises(RuntimeError, match="attempt 2"):
        futures["broken"].result()
    executor.shutdown()
    assert calls == {"ok": 1, "flaky": 2, "broken": 2}
    with pytest.raises(ValueError, match="max_workers must be >= 1"):
        ThreadExecutor(max_workers=0)
