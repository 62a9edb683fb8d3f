"""Prefect, or none: the switch, task decorators and artifacts that work either way.

By default every stage is a Prefect flow run (its tasks, logs and artifacts in Prefect's UI), on the server the
stages share (:mod:`tasks.server`) or the one ``PREFECT_API_URL`` names. Env ``FEDAUDIO_PREFECT=off`` runs the same
code without Prefect: no server, no flow or task runs, Prefect never imported (about 3 s a stage on a 2-core
machine: its import, a flow run, the server), the clients of a round in threads of the stage. What a stage
computes and writes is the same either way (its DVC outputs, its MLflow run); only Prefect's record of it is
missing, and the summaries the artifacts would hold are still printed. For quick iterations on small configs:

    FEDAUDIO_PREFECT=off dvc exp run -S federation.rounds=3

Nothing here imports Prefect until an orchestrated run needs it.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, ParamSpec, TypeVar

from fedcore.errors import ConfigError

PREFECT_ENV = "FEDAUDIO_PREFECT"
"""The environment variable that turns Prefect off (``off``, ``0``, ``false``, ``no``) or on (unset, ``on``, ...)."""
_OFF = frozenset({"off", "0", "false", "no"})
_ON = frozenset({"", "on", "1", "true", "yes"})

P = ParamSpec("P")
R = TypeVar("R")


def orchestrated() -> bool:
    """Whether stages run as Prefect flows (env :data:`PREFECT_ENV`); an unknown value is a ConfigError."""
    value = os.environ.get(PREFECT_ENV, "").strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise ConfigError(f"env {PREFECT_ENV}={os.environ[PREFECT_ENV]!r}: use 'off' (run without Prefect) or 'on'.")


def in_flow_run() -> bool:
    """Whether this code runs inside a Prefect flow or task run (never true without Prefect)."""
    if not orchestrated():
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class Task(Generic[P, R]):
    """A function that runs as a Prefect task (or flow) when orchestrated and as itself otherwise.

    The Prefect object (``prefect.task(function, **options)``, with ``cache_policy=NO_CACHE`` unless ``options``
    say otherwise: every task here reads and writes files; ``prefect.flow`` with ``kind="flow"``) is built on
    first orchestrated use, so importing a module of tasks does not import Prefect. ``with_options`` and
    ``submit`` are Prefect's when orchestrated; without Prefect, ``with_options`` gives the same plain function
    (a flow's task runner and names do not apply) and ``submit`` is an error (use an executor of
    :mod:`tasks.rounds`).
    """

    def __init__(self, function: Callable[P, R], options: Mapping[str, Any], kind: str = "task") -> None:
        if kind not in ("task", "flow"):
            raise ValueError(f"Task: kind must be 'task' or 'flow', got {kind!r}")
        functools.update_wrapper(self, function)
        self.fn, self._options, self._kind = function, dict(options), kind
        self._prefect: Any = None
        self._lock = threading.Lock()

    def prefect(self) -> Any:
        """The Prefect task or flow (built now if it was not)."""
        with self._lock:
            if self._prefect is None:
                import prefect

                if self._kind == "task":
                    from prefect.cache_policies import NO_CACHE

                    self._prefect = prefect.task(self.fn, **{"cache_policy": NO_CACHE, **self._options})
                else:
                    self._prefect = prefect.flow(self.fn, **self._options)
            return self._prefect

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function: as a task run of the current flow when orchestrated, directly otherwise."""
        if orchestrated():
            return self.prefect()(*args, **kwargs)  # type: ignore[no-any-return]
        return self.fn(*args, **kwargs)

    def with_options(self, **options: Any) -> Any:
        """Prefect's ``with_options`` when orchestrated; this same function otherwise."""
        return self.prefect().with_options(**options) if orchestrated() else self

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        """Prefect's ``Task.submit`` (a future of the flow's task runner); only when orchestrated."""
        if not orchestrated():
            raise RuntimeError(f"{self.fn.__qualname__}: submit needs Prefect ({PREFECT_ENV} is off)")
        return self.prefect().submit(*args, **kwargs)


def task(**options: Any) -> Callable[[Callable[P, R]], Task[P, R]]:
    """Decorator: ``@task(name="extract-features")`` makes a :class:`Task` with Prefect's ``task`` options."""

    def decorate(function: Callable[P, R]) -> Task[P, R]:
        return Task(function, options)

    return decorate


def publish_table(rows: Sequence[Mapping[str, Any]], *, key: str, description: str | None = None) -> None:
    """A table artifact of the current flow run (``prefect.artifacts.create_table_artifact``); none without one."""
    if in_flow_run():
        from prefect.artifacts import create_table_artifact

        create_table_artifact([dict(row) for row in rows], key=key, description=description)


def publish_markdown(markdown: str, *, key: str, description: str | None = None) -> None:
    """A markdown artifact of the current flow run (``create_markdown_artifact``); none without one."""
    if in_flow_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown, key=key, description=description)
