"""What the orchestration layer gives the round loop (:func:`fedcore.federation.engine.run_rounds`); run records.

The executor, tracking and progress callbacks:

- :class:`TaskRunnerExecutor` submits each client job as a Prefect task run of the calling flow (so it runs on the
  flow's task runner: threads, Dask or Ray), named by what it does (``train client 3 round 7``), retried once;
  without Prefect (:mod:`tasks.orchestration`), :class:`ThreadExecutor` runs the same jobs in a thread pool, with
  the same retry.
- :class:`TrackingCallback` logs every round to MLflow (metrics with ``step=round``, the model when asked, the
  rejected clients and the resume reports) and keeps the run id in the checkpoint, so a resumed run continues its
  MLflow run; :class:`ProgressCallback` shows the rounds as a bar and a Prefect progress artifact.
- The *run record* (``<metrics>.run.json`` beside a stage's metrics file, not a DVC output and ignored by git) holds
  what differs between two runs of the same inputs: timings, MLflow run id, registered version, host. The stage's
  DVC outputs then depend on its inputs and params only, so a committed ``dvc.lock`` reproduces on a fresh clone.
"""

from __future__ import annotations

import platform
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from typing_extensions import override

from fedcore.aggregation.state import StateDict
from fedcore.federation.checkpoint import save_state
from fedcore.federation.engine import Callback, Job, Result, RoundResult, Run, run_job
from tasks.common import read_json, write_json
from tasks.progress import Progress
from tasks.tracking import WEIGHTS_FILE

#: Suffix of the run record beside a stage's metrics file (``metrics/federate.json`` -> ``federate.run.json``).
RUN_RECORD_SUFFIX = ".run.json"


# ------------------------------------------------------------------------------------- executor and callbacks
class TaskRunnerExecutor:
    """Runs each client job as a task run of the calling Prefect flow, on the flow's task runner.

    Parameters
    ----------
    retries : int, default 1
        Retries of a job that raised before it counts as failed (the failure policy then rejects it).
    """

    def __init__(self, retries: int = 1) -> None:
        from prefect import task
        from prefect.cache_policies import NO_CACHE

        self._task = task(run_job, name="train client", cache_policy=NO_CACHE, retries=retries)

    def submit(self, job: Job) -> Result:
        """Submit ``job`` as a task run named by what it does; returns its Prefect future."""
        return self._task.with_options(task_run_name=job.name).submit(job)


class ThreadExecutor:
    """Runs each client job in a pool of ``max_workers`` threads of this process, without Prefect.

    The jobs, their retry and what they compute are those of :class:`TaskRunnerExecutor` on Prefect's thread
    runner.

    Parameters
    ----------
    max_workers : int
        Jobs run at once.
    retries : int, default 1
        Retries of a job that raised (not an interrupt) before it counts as failed.
    """

    def __init__(self, max_workers: int, retries: int = 1) -> None:
        if max_workers < 1 or retries < 0:
            raise ValueError(f"ThreadExecutor: max_workers must be >= 1 and retries >= 0; got {max_workers}, "
                             f"{retries}.")
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="client")
        self._retries = retries

    def submit(self, job: Job) -> Future[Any]:
        """Queue ``job``; the future gives its update or its last error."""
        return self._pool.submit(self._run, job)

    def _run(self, job: Job) -> Any:
        for attempt in range(self._retries + 1):
            try:
                return run_job(job)
            except Exception:
                if attempt == self._retries:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def shutdown(self) -> None:
        """Wait for the queued jobs and stop the threads."""
        self._pool.shutdown(wait=True)


class TrackingCallback(Callback):
    """Log a run of :func:`~fedcore.federation.engine.run_rounds` to MLflow through a ``FederateTracker``.

    Parameters
    ----------
    tracker : tasks.tracking.FederateTracker
        The stage's tracker (not started).
    params : Mapping
        Flat params logged with the run.
    run_name : str
        MLflow run name.
    model : torch.nn.Module
        An instance of the global model's architecture, loaded with a round's state when that round's model is
        logged.
    input_shape : tuple of int
        The model's input shape (one example).
    log_model : callable
        ``log_model(round, row) -> bool``: whether the round's model is logged (the round a stop rule ends the run
        at always is: ``run.stop``).
    export : bool, default False
        Trace the architecture once at start (``FederateTracker.prepare_export``), so each round's logging only
        swaps its weights into the program.
    """

    def __init__(self, tracker: Any, params: Mapping[str, Any], *, run_name: str, model: Any,
                 input_shape: tuple[int, ...], log_model: Callable[[int, Mapping[str, float]], bool],
                 export: bool = False) -> None:
        self.tracker, self.params, self.run_name = tracker, dict(params), run_name
        self.model, self.input_shape, self.should_log, self.export = model, input_shape, log_model, export
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    def _log(self, server_round: int, metrics: Mapping[str, float], state: StateDict | None) -> None:
        weights = None
        if state is not None:
            assert self._scratch is not None
            self.model.load_state_dict(state)
            weights = Path(self._scratch.name) / WEIGHTS_FILE
            save_state(weights, state)
        self.tracker.log_round(server_round, metrics, self.model if state is not None else None, self.input_shape,
                               weights)

    @override
    def on_start(self, run: Run) -> None:
        self._scratch = tempfile.TemporaryDirectory()
        self.tracker.start(self.params, resume_run_id=run.meta.get("mlflow_run_id"), run_name=self.run_name)
        if self.export:
            self.tracker.prepare_export(self.model, self.input_shape, WEIGHTS_FILE)
        if run.initial and not run.resumed:  # the initial model's scores (e.g. a random encoder's): round 0
            self._log(0, run.initial, run.state)
        self.tracker.backfill([{"round": 0.0, **run.initial}, *run.history] if run.initial else run.history)
        if run.reports:  # what the resume had to skip (damaged or mismatching files), also printed
            self.tracker.log_record(f"resume/after_round_{run.start_round:04d}.json", {"reports": run.reports})

    @override
    def on_round(self, run: Run, server_round: int, row: dict[str, float], record: dict[str, Any],
                 result: RoundResult) -> None:
        if record["rejected"]:
            self.tracker.log_record(f"rejections/round_{server_round:04d}.json",
                                    {k: record[k] for k in ("round", "failed", "rejected")})
        metrics = {k: v for k, v in row.items() if k != "round"}
        last = run.stop is not None  # a stop rule ends the run here: its model is the final one, always logged
        self._log(server_round, metrics, run.state if last or self.should_log(server_round, row) else None)

    @override
    def meta(self) -> dict[str, Any]:
        return {"mlflow_run_id": self.tracker.run_id}

    def _close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    @override
    def on_end(self, run: Run) -> None:
        self._close()

    @override
    def on_error(self, error: BaseException) -> None:
        self._close()
        self.tracker.fail()


class ProgressCallback(Callback):
    """The rounds as a progress bar (and a Prefect progress artifact ``key``); ``postfix(row)`` beside it."""

    def __init__(self, total: int, description: str, key: str,
                 postfix: Callable[[Mapping[str, float]], dict[str, object]] | None = None) -> None:
        self.total, self.description, self.key, self.postfix = total, description, key, postfix
        self.bar: Progress | None = None

    @override
    def on_start(self, run: Run) -> None:
        self.bar = Progress(self.total, self.description, key=self.key, line_interval_s=0.0)  # a line per round
        self.bar.update(run.start_round)

    @override
    def on_round(self, run: Run, server_round: int, row: dict[str, float], record: dict[str, Any],
                 result: RoundResult) -> None:
        if self.bar is not None:
            self.bar.update(1, self.postfix(row) if self.postfix else None)

    @override
    def on_end(self, run: Run) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @override
    def on_error(self, error: BaseException) -> None:
        self.on_end(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- run record
def run_record_path(metrics_path: Path) -> Path:
    """Where the run record of the stage whose metrics file is ``metrics_path`` lives."""
    metrics_path = Path(metrics_path)
    return metrics_path.with_name(metrics_path.stem + RUN_RECORD_SUFFIX)


def write_run_record(metrics_path: Path, record: Mapping[str, Any]) -> Path:
    """Write the run record (timings, ids) beside ``metrics_path``; returns its path."""
    path = run_record_path(metrics_path)
    write_json(path, {**record, "host": platform.node(), "python": platform.python_version()}, sort_keys=True)
    return path


def read_run_record(metrics_path: Path) -> dict[str, Any]:
    """The run record beside ``metrics_path`` ({} when there is none)."""
    path = run_record_path(metrics_path)
    return dict(read_json(path)) if path.is_file() else {}


def is_timing(key: str) -> bool:
    """Whether a per-round metric is a wall-clock measurement (``round_seconds``, ``client_seconds_mean``, ...)."""
    return "seconds" in key


def split_timings(history: Sequence[Mapping[str, float]]) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The per-round history without its timings (for DVC outputs) and the timings alone (for the run record)."""
    rows = [{k: v for k, v in row.items() if not is_timing(k)} for row in history]
    timings = [{"round": row["round"], **{k: v for k, v in row.items() if is_timing(k)}} for row in history]
    return rows, timings


def timing_summary(timings: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Total and median seconds per round (logging and checkpoint included where measured)."""
    walls = sorted(float(row.get("round_wall_seconds", row.get("round_seconds", 0.0))) for row in timings)
    if not walls:
        return {"seconds_total": 0.0, "seconds_per_round_median": 0.0}
    return {"seconds_total": round(sum(walls), 3), "seconds_per_round_median": round(walls[len(walls) // 2], 4)}
