"""What every round loop shares: client results under the failure policy, the quorum, and the run record.

- :func:`gather_updates` waits for a round's client futures in client order; a client whose task raised (after
  its task retries) is *failed* with its reason instead of ending the run.
- :func:`quorum_of` is the round's quorum (``federation.min_accepted``) and :func:`stop_on_quorum` turns a
  :class:`~fedcore.errors.QuorumError` into the stage's message: the round is not applied, the last checkpoint is
  kept, a rerun resumes from it.
- :func:`resume_from` loads the newest verified checkpoint (and, for stages whose clients keep a state, the newest
  round whose client states verify too), printing each file it had to skip.
- The *run record* (``<metrics>.run.json`` beside a stage's metrics file, not a DVC output and ignored by git) holds
  what differs between two runs of the same inputs: timings, MLflow run id, registered version, host. The stage's
  DVC outputs then depend on its inputs and params only, so a committed ``dvc.lock`` reproduces on a fresh clone.
"""

from __future__ import annotations

import logging
import platform
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict
from fedcore.config import FederationConfig
from fedcore.errors import QuorumError
from fedcore.federation.checkpoint import Checkpointer
from fedcore.federation.policy import required_updates
from tasks.common import read_json, write_json

log = logging.getLogger(__name__)

#: Suffix of the run record beside a stage's metrics file (``metrics/federate.json`` -> ``federate.run.json``).
RUN_RECORD_SUFFIX = ".run.json"


def gather_updates(futures: Iterable[tuple[int, Any]]) -> tuple[list[ClientUpdate], dict[int, str]]:
    """Results of a round's client futures: the updates (by client id) and the clients that failed.

    Parameters
    ----------
    futures : iterable of (int, future)
        ``(client_id, future)`` pairs; ``future.result()`` returns a :class:`ClientUpdate` or raises.

    Returns
    -------
    updates : list of ClientUpdate
        Sorted by client id.
    failed : dict of int to str
        ``{client_id: reason}`` of the clients whose task raised (an ordinary exception; an interrupt is raised).
    """
    updates: list[ClientUpdate] = []
    failed: dict[int, str] = {}
    for client, future in futures:
        try:
            updates.append(future.result())
        except Exception as error:  # the client's own failure: rejected, the round goes on (failure policy)
            reason = f"training raised {type(error).__name__}: {error}"
            failed[int(client)] = reason[:2000]
            log.warning("client %d: %s", client, reason)
    return sorted(updates, key=lambda u: u.client_id), failed


def quorum_of(fed: FederationConfig, num_jobs: int) -> int:
    """The accepted updates a round of ``num_jobs`` client jobs needs (``federation.min_accepted``)."""
    return required_updates(fed.min_accepted, num_jobs)


def stop_on_quorum(error: QuorumError, stage: str, checkpoints: Path, last_round: int) -> QuorumError:
    """The stage's error for a round that failed its quorum: what happened, what was kept, what to do."""
    kept = (f"the checkpoint of round {last_round} in {str(checkpoints)!r} is kept and a rerun resumes from it"
            if last_round > 0 else "no round had finished, so a rerun starts from round 0")
    return QuorumError(
        f"{stage}: {error} The round was not applied; {kept}. Fix: find why those clients failed (reasons above), "
        "or lower federation.min_accepted.", server_round=error.server_round, rejected=error.rejected)


def rejection_record(server_round: int, failed: Mapping[int, str], rejected: Mapping[int, str]) -> dict[str, Any]:
    """One round's rejected clients with their reasons (failed ones included), for the round log."""
    return {"round": server_round, "failed": sorted(failed),
            "rejected": {str(client): reason for client, reason in sorted(rejected.items())}}


def resume_from(checkpointer: Checkpointer, stage: str, *, reference: StateDict | None = None,
                also_verify: Callable[[int], list[str]] | None = None,
                ) -> tuple[tuple[int, StateDict, dict[str, Any], dict[str, Any]] | None, list[str]]:
    """The newest verified checkpoint of ``checkpointer`` (or None) and what was reported while looking for it.

    Each damaged or mismatching file is reported on stderr as ``<stage>: <message>`` (and kept on disk); the run
    falls back to the newest round whose file verifies against ``reference`` (keys, shapes, dtypes, finite
    values) and for which ``also_verify(round)`` (e.g. the client store's check) finds nothing.
    :class:`~fedcore.errors.CheckpointError` (files there, none usable) propagates: its message names the fix.
    """
    reports: list[str] = []

    def report(message: str) -> None:
        reports.append(message)
        sys.stderr.write(f"{stage}: {message}\n")  # stderr directly: Prefect's log_prints captures print
        sys.stderr.flush()

    loaded = checkpointer.load_latest(reference=reference, also_verify=also_verify, report=report)
    return loaded, reports


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
