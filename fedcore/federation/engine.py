"""The round loop of every federated method: :func:`run_rounds` (``plan``, ``executor``, ``checkpointer``, callbacks).

One loop runs every kind of training; what differs between kinds is a :class:`Plan`:

- :meth:`Plan.jobs` samples the round's clients and says what each trains (a :class:`Job`: a module-level function
  and its arguments, so any executor can ship it to a thread, a process or a cluster);
- :meth:`Plan.combine` turns the updates into the next global state under the failure policy (screening, the
  quorum: :func:`fedcore.aggregation.base.screen_round`), and reports who was rejected and why;
- :meth:`Plan.evaluate` scores the new state (``{}`` for a round that is not scored);
- :meth:`Plan.should_stop` may end the run before :attr:`Plan.rounds`, which is then the cap (default: never; a
  plan sets :attr:`Plan.stop_rule`, e.g. a :class:`Plateau` of a validation metric);
- :meth:`Plan.stateful` names every stateful part of the server (a server optimiser's moments, ...): each is saved
  in the round's checkpoint and restored on resume through the ``state_dict``/``load_state_dict`` protocol, and
  :attr:`Plan.client_store` is the clients' kept state (personal models, heads, optimiser buffers), verified,
  rolled back and committed with the checkpoint.

The loop owns what every method shares, once: resume from the newest verified checkpoint (damaged files reported
and skipped, :mod:`fedcore.federation.checkpoint`), submission of the jobs through the injected *executor* (a flow
passes its task runner; tests and sweeps pass :class:`SerialExecutor`), collection of the results in client order
with failed clients rejected (:func:`gather_updates`), the quorum (:func:`~fedcore.federation.policy.required_updates`
of ``plan.min_accepted``), the thread policy (clients on ``client_threads`` each, the server's work on
``server_threads``), the round's record (sampled, failed, rejected clients), the checkpoint of every round, and the
callbacks (tracking, progress) that see each round before it is checkpointed.

A killed run resumes to the same result as an uninterrupted one: every random draw of a round is seeded by the
round (:mod:`fedcore.federation.sampling`), and everything else the next round needs is in the checkpoint. The stop
rule reads only the history of rounds (in every checkpoint), so a resumed run stops at the same round; one resumed
after the checkpoint of its stopping round runs no further round.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict
from fedcore.errors import QuorumError
from fedcore.federation.checkpoint import Checkpointer
from fedcore.federation.client_store import ClientStore
from fedcore.federation.policy import required_updates

__all__ = [
    "Callback",
    "Executor",
    "Job",
    "Plan",
    "RoundResult",
    "Run",
    "Plateau",
    "SerialExecutor",
    "Stateful",
    "Stop",
    "StopRule",
    "gather_updates",
    "run_job",
    "run_rounds",
    "stop_on_quorum",
]

log = logging.getLogger("fedcore.federation")


@dataclass(frozen=True)
class Job:
    """One client's work in one round: ``fn(*args)`` returns its :class:`ClientUpdate`.

    ``fn`` is a module-level function (picklable by reference) so that thread, process and cluster executors all
    run it; ``threads`` is the torch thread count it runs on (a client's arithmetic depends on it).
    """

    client: int
    server_round: int
    fn: Callable[..., ClientUpdate]
    args: tuple[Any, ...]
    threads: int = 1
    kind: str = "train"

    @property
    def name(self) -> str:
        """What the job does, for logs and task names: ``train client 3 round 7``."""
        return f"{self.kind} client {self.client} round {self.server_round}"


def run_job(job: Job) -> ClientUpdate:
    """Run ``job`` on its thread count (what every executor calls, in whatever worker)."""
    if torch.get_num_threads() != job.threads:
        torch.set_num_threads(job.threads)
    return job.fn(*job.args)


@runtime_checkable
class Result(Protocol):
    """What an executor returns per job: ``result()`` gives the update or raises the job's error."""

    def result(self) -> Any:
        """The job's update; raises what the job raised."""


@runtime_checkable
class Executor(Protocol):
    """Runs a round's jobs: ``submit(job)`` returns at once with a :class:`Result` (it may run later)."""

    def submit(self, job: Job) -> Result:
        """Start ``job`` (or queue it); returns at once."""


class _Done:
    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error

    def result(self) -> Any:
        """The value, or raise the error."""
        if self._error is not None:
            raise self._error
        return self._value


class SerialExecutor:
    """Runs each job at once in the calling thread (tests, sweeps, debugging).

    An ordinary exception of a job is kept for its ``result()``, as a pool's future would; an interrupt propagates.
    """

    def submit(self, job: Job) -> Result:
        """Run ``job`` now; its update (or error) waits in the returned result."""
        try:
            return _Done(run_job(job))
        except Exception as error:  # the client's own failure: the loop rejects it (failure policy)
            return _Done(error=error)


@runtime_checkable
class Stateful(Protocol):
    """A stateful part of the server (e.g. a server optimiser): saved in every checkpoint, restored on resume."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The part's state, as named tensors."""

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""


@dataclass
class RoundResult:
    """What :meth:`Plan.combine` returns for one round.

    Attributes
    ----------
    state : dict of str to Tensor
        The next global state (every entry, also those no client sent).
    rejected : dict of int to str
        ``"client <id>: <reason>"`` of every client left out (failed, screened out, refused by the rule).
    metrics : dict of str to float
        The round's metrics known from combining (train loss, bytes, detection counts, ...).
    record : dict
        JSON-serialisable detail kept in the round's record (weights, flagged clients, ...).
    """

    state: StateDict
    rejected: Mapping[int, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stop:
    """Why a run ended.

    ``reason``: ``"plateau"`` (a :class:`Plateau` rule) or ``"rounds"`` (it ran all its rounds); ``round``: the last
    round run; ``detail``: a sentence for people.
    """

    reason: str
    round: int
    detail: str


@runtime_checkable
class StopRule(Protocol):
    """When to stop before the plan's last round: a pure function of the history of finished rounds."""

    def __call__(self, history: Sequence[Mapping[str, float]]) -> Stop | None:
        """The stop after the last row of ``history`` (one row per finished round, oldest first), or None."""


#: A gain this close under ``min_gain`` still counts as reaching it (accuracies are ratios: float rounding).
GAIN_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Plateau:
    """Stop once ``metric`` (higher is better; a validation metric) gained under ``min_gain`` in ``patience`` rounds.

    After round t, the gain is the best value of the rounds t - patience + 1 .. t minus the best value of every
    round before them; the run stops when it is below ``min_gain`` (a gain equal to ``min_gain`` goes on). So it
    never stops before round patience + 1. Only rows that hold ``metric`` count (a round that is not scored is
    skipped; the rule never stops after one).
    """

    metric: str
    min_gain: float = 0.005
    patience: int = 5

    def __post_init__(self) -> None:
        if not self.patience >= 1 or not self.min_gain >= 0:
            raise ValueError(f"Plateau: patience must be >= 1 and min_gain >= 0. Got {self.patience!r}, "
                             f"{self.min_gain!r}.")

    def __call__(self, history: Sequence[Mapping[str, float]]) -> Stop | None:
        """The stop after the last row of ``history``, or None (see the class docstring)."""
        if not history or self.metric not in history[-1]:
            return None
        last = int(history[-1]["round"])
        first = last - self.patience + 1  # first round of the window
        window = [row[self.metric] for row in history if self.metric in row and row["round"] >= first]
        before = [row[self.metric] for row in history if self.metric in row and row["round"] < first]
        if not before:
            return None
        gain = max(window) - max(before)
        if gain >= self.min_gain - GAIN_TOLERANCE:
            return None
        return Stop("plateau", last, f"{self.metric} gained {gain:+.4f} in rounds {first}-{last} (best "
                                     f"{max(window):.4f} against {max(before):.4f} before), under {self.min_gain:g}")


class Plan(ABC):
    """One kind of federated training, run by :func:`run_rounds` (see the module docstring).

    Subclasses set :attr:`stage`, :attr:`rounds`, :attr:`min_accepted` (and :attr:`client_store` when clients
    keep a state) and implement :meth:`initial_state`, :meth:`jobs`, :meth:`combine` and :meth:`evaluate`.
    """

    #: Name in messages (``federate``, ``modality``, ...).
    stage: str = "rounds"
    #: Rounds of the run: the most it runs when :attr:`stop_rule` may stop it before.
    rounds: int = 1
    #: The quorum (``federation.min_accepted``): a share of the round's jobs in (0, 1] or a count >= 1.
    min_accepted: int | float = 1
    #: The clients' kept state, or None when clients keep nothing between rounds.
    client_store: ClientStore | None = None
    #: When to stop before :attr:`rounds` (read by :meth:`should_stop`); None: run every round.
    stop_rule: StopRule | None = None

    @abstractmethod
    def initial_state(self) -> StateDict:
        """The global state of round 0 (also what a checkpoint's state must fit: keys, shapes, dtypes)."""

    def stateful(self) -> Mapping[str, Stateful]:
        """The server's stateful parts by name (default: none)."""
        return {}

    @abstractmethod
    def jobs(self, server_round: int, state: StateDict) -> tuple[list[int], list[Job]]:
        """The round's sampled clients, and the jobs of those that train (in client order)."""

    @abstractmethod
    def combine(self, state: StateDict, updates: Sequence[ClientUpdate], failed: Mapping[int, str],
                server_round: int, min_accepted: int) -> RoundResult:
        """The next state from the round's ``updates`` (client order); ``failed`` clients raised.

        Raises :class:`~fedcore.errors.QuorumError` when fewer than ``min_accepted`` updates are accepted.
        """

    @abstractmethod
    def evaluate(self, state: StateDict, server_round: int, result: RoundResult) -> dict[str, float]:
        """Scores of the new ``state`` (``{}``: the round is not scored)."""

    def initial_metrics(self, state: StateDict) -> dict[str, float]:
        """Scores of the initial state, logged as round 0 (default: none). Called on a fresh start only."""
        return {}

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable facts of the run the plan needs again on resume (default: none)."""
        return {}

    def restore(self, meta: Mapping[str, Any]) -> None:  # noqa: B027  (optional hook: nothing to restore by default)
        """Take back what :meth:`meta` saved (on resume)."""

    def should_stop(self, history: Sequence[Mapping[str, float]]) -> Stop | None:
        """Whether the run stops after the last row of ``history`` (default: :attr:`stop_rule`'s answer; never).

        Called after every round with the history up to it (and on resume with the checkpoint's): it must
        depend on ``history`` only, so that a resumed run stops where an uninterrupted one does.
        """
        return None if self.stop_rule is None else self.stop_rule(history)


@dataclass
class Run:
    """The state of a run, as callbacks see it and :func:`run_rounds` returns it.

    Attributes
    ----------
    start_round : int
        The last round done before this call (0 on a fresh start).
    state : dict of str to Tensor
        The current global state.
    history : list of dict
        One row per finished round: ``round`` and the round's metrics.
    records : list of dict
        One record per finished round: ``round``, ``sampled``, ``failed``, ``rejected`` and the plan's record.
    initial : dict of str to float
        Scores of the initial state (round 0), if the plan has any.
    resumed : bool
        Whether this call resumed from a checkpoint.
    meta : dict
        The checkpoint's meta when resumed (callbacks find what they saved there), else ``{}``.
    reports : list of str
        What the resume had to skip (damaged or mismatching files).
    stop : Stop, optional
        Why the run ended: set in the round a rule stops it (before the callbacks see that round, so they can
        treat it as the last), and always once :func:`run_rounds` returns (``reason="rounds"``: all rounds ran).
    """

    start_round: int
    state: StateDict
    history: list[dict[str, float]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    resumed: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)
    stop: Stop | None = None


class Callback:
    """Hooks of :func:`run_rounds` (tracking, progress); every method is optional."""

    def on_start(self, run: Run) -> None:
        """Before the first round of this call (after the resume)."""

    def on_round(self, run: Run, server_round: int, row: dict[str, float], record: dict[str, Any],
                 result: RoundResult) -> None:
        """After a round is combined and scored, before its checkpoint; ``run.state`` is the new state.

        ``run.stop`` is set when a stop rule ends the run after this round (then the last).
        """

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable data to keep in each checkpoint (e.g. the tracking run's id)."""
        return {}

    def on_end(self, run: Run) -> None:
        """After the last round."""

    def on_error(self, error: BaseException) -> None:
        """When the loop raises (failure, interrupt); the error is raised again afterwards."""


def gather_updates(results: Iterable[tuple[int, Result]]) -> tuple[list[ClientUpdate], dict[int, str]]:
    """Results of a round's jobs: the updates (by client id) and the clients that failed.

    Parameters
    ----------
    results : iterable of (int, Result)
        ``(client_id, result)`` pairs; ``result.result()`` returns a :class:`ClientUpdate` or raises.

    Returns
    -------
    updates : list of ClientUpdate
        Sorted by client id.
    failed : dict of int to str
        ``{client_id: reason}`` of the clients whose job raised (an ordinary exception; an interrupt is raised).
    """
    updates: list[ClientUpdate] = []
    failed: dict[int, str] = {}
    for client, result in results:
        try:
            updates.append(result.result())
        except Exception as error:  # the client's own failure: rejected, the round goes on (failure policy)
            reason = f"training raised {type(error).__name__}: {error}"
            failed[int(client)] = reason[:2000]
            log.warning("client %d: %s", client, reason)
    return sorted(updates, key=lambda u: u.client_id), failed


def stop_on_quorum(error: QuorumError, stage: str, checkpoints: Path, last_round: int) -> QuorumError:
    """The stage's error for a round that failed its quorum: what happened, what was kept, what to do."""
    kept = (f"the checkpoint of round {last_round} in {str(checkpoints)!r} is kept and a rerun resumes from it"
            if last_round > 0 else "no round had finished, so a rerun starts from round 0")
    return QuorumError(
        f"{stage}: {error} The round was not applied; {kept}. Fix: find why those clients failed (reasons above), "
        "or lower federation.min_accepted.", server_round=error.server_round, rejected=error.rejected)


def _say(stage: str, message: str) -> None:
    sys.stderr.write(f"{stage}: {message}\n")  # stderr directly: a flow's captured print would hide it
    sys.stderr.flush()


def _resume(plan: Plan, checkpointer: Checkpointer, reference: StateDict) -> Run:
    """The run to continue: the newest verified checkpoint's, or a fresh one."""
    reports: list[str] = []

    def report(message: str) -> None:
        reports.append(message)
        _say(plan.stage, message)

    store = plan.client_store
    loaded = checkpointer.load_latest(reference=reference, report=report,
                                      also_verify=store.verify if store is not None else None)
    if loaded is None:
        if store is not None:
            store.reset()
        return Run(0, reference, initial=dict(plan.initial_metrics(reference)), reports=reports)
    start, state, extra, meta = loaded
    if store is not None:  # states written after the checkpoint (a round cut short) are dropped
        store.rollback(start)
    for name, part in plan.stateful().items():
        prefix = f"{name}/"
        part.load_state_dict({k[len(prefix):]: v for k, v in extra.items() if k.startswith(prefix)})
    plan.restore(dict(meta.get("plan", {})))
    _say(plan.stage, f"resuming after round {start} of {plan.rounds} from {checkpointer.folder}")
    return Run(start, state, list(meta.get("history", [])), list(meta.get("records", [])),
               dict(meta.get("initial", {})), True, dict(meta), reports)


def run_rounds(plan: Plan, executor: Executor, checkpointer: Checkpointer, callbacks: Sequence[Callback] = (), *,
               client_threads: int = 1, server_threads: int | None = None) -> Run:
    """Run (or resume) ``plan``'s rounds up to ``plan.rounds`` or its stop rule's stop; see the module docstring.

    Parameters
    ----------
    plan : Plan
        The kind of training.
    executor : Executor
        Runs the clients' jobs (:class:`SerialExecutor`, or a flow's task runner).
    checkpointer : Checkpointer
        Where every round is checkpointed (its fingerprint names the run: params and data).
    callbacks : sequence of Callback
        Tracking, progress, ...: called in order.
    client_threads : int, default 1
        Torch threads per client job (part of a client's arithmetic: a param of the run).
    server_threads : int, optional
        Torch threads for the server's work (combination, evaluation); default: the cores.

    Returns
    -------
    Run
        The finished run (``state``: the last round's global state; ``stop``: why it ended, and when).

    Raises
    ------
    QuorumError
        If a round has fewer accepted updates than its quorum: the round is not applied, the last checkpoint kept.
    CheckpointError
        If the checkpoint folder holds files of this run of which none verifies.
    """
    server = server_threads or os.cpu_count() or 1
    torch.set_num_threads(server)  # the initial state's scores are the server's work too
    run = _resume(plan, checkpointer, plan.initial_state())
    store = plan.client_store
    # A run killed after the checkpoint of the round its rule stopped at has stopped: the rule reads the history.
    stop = run.stop = plan.should_stop(run.history) if run.history else None
    if stop is not None:
        _say(plan.stage, f"the run had stopped after round {stop.round}: {stop.detail}")
    last_round = plan.rounds if stop is None else run.start_round
    try:
        for callback in callbacks:
            callback.on_start(run)
        for server_round in range(run.start_round + 1, last_round + 1):
            started = time.perf_counter()
            sampled, jobs = plan.jobs(server_round, run.state)
            clients = [job.client for job in jobs]
            torch.set_num_threads(client_threads)  # clients in parallel, each on its share of the cores
            submitted = []
            while jobs:  # the loop keeps no job (its data) once submitted: memory follows the jobs running
                job = jobs.pop(0)
                submitted.append((job.client, executor.submit(job)))
                del job
            updates, failed = gather_updates(submitted)
            del submitted
            torch.set_num_threads(server)  # no client trains now: the server's turn
            try:
                result = plan.combine(run.state, updates, failed, server_round,
                                      required_updates(plan.min_accepted, len(clients)))
            except QuorumError as error:
                raise stop_on_quorum(error, plan.stage, checkpointer.folder, server_round - 1) from None
            metrics = plan.evaluate(result.state, server_round, result)
            metrics.update(result.metrics)
            metrics.update(num_failed=float(len(failed)), num_rejected=float(len(result.rejected)),
                           round_seconds=time.perf_counter() - started)
            row = {"round": float(server_round), **metrics}
            record = {"round": server_round, "sampled": list(sampled), "failed": sorted(failed),
                      "rejected": {str(k): v for k, v in sorted(result.rejected.items())}, **result.record}
            run.state = result.state
            stop = run.stop = plan.should_stop([*run.history, row])
            for callback in callbacks:
                callback.on_round(run, server_round, row, record, result)
            run.history.append(row)
            run.records.append(record)
            extra = {f"{name}/{key}": value for name, part in plan.stateful().items()
                     for key, value in part.state_dict().items()}
            meta: dict[str, Any] = {}
            for callback in callbacks:
                meta.update(callback.meta())
            meta.update(history=run.history, records=run.records, initial=run.initial, plan=plan.meta())
            checkpointer.save(server_round, run.state, extra or None, meta)
            if store is not None:  # the checkpoint is durable: versions no kept checkpoint needs go
                store.commit(server_round, clients, oldest_kept=checkpointer.kept_rounds()[0])
            # The whole round, logging and checkpoint included (a resumed run's last row before the kill keeps
            # round_seconds only).
            row["round_wall_seconds"] = time.perf_counter() - started
            if stop is not None:
                _say(plan.stage, f"stopped after round {server_round} (at most {plan.rounds}): {stop.detail}")
                break
        last = int(run.history[-1]["round"]) if run.history else run.start_round
        run.stop = stop or Stop("rounds", last, f"ran all {plan.rounds} rounds")
        for callback in callbacks:
            callback.on_end(run)
    except BaseException as error:
        for callback in callbacks:
            callback.on_error(error)
        raise
    return run
