"""Truthful MLflow run state (issue 19, item 5): RUNNING while a stage runs, FINISHED only at its end, FAILED or
KILLED when it stops early (set by the next start when the process died without a word), and a resumed run holds
every round of its checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import torch

from fedcore.config import MlflowConfig, ModelConfig
from fedcore.models.spec import build, classifier_spec
from tasks.tracking import (
    BACKFILLED,
    END_REASON,
    MODELS_NOT_RESTORED,
    OWNER_HOST,
    OWNER_PID,
    OWNER_STARTED,
    PARENT_ENV,
    RESTORED_FROM,
    FederateTracker,
    end_run,
    owner_tags,
    run_status,
    start_parent_run,
)

REPO = Path(__file__).resolve().parents[2]
SPEC = classifier_spec(ModelConfig(name="cnn", width=2, depth=1), 3, (1, 4, 5))


@pytest.fixture()
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowConfig:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_ENV, raising=False)
    return MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="state",
                        registered_model="state-model")


def _status(run_id: str) -> str:
    return str(mlflow.MlflowClient().get_run(run_id).info.status)


def _history(rounds: range) -> list[dict[str, float]]:
    return [{"round": float(r), "accuracy": r / 10, "loss": 1.0 / r} for r in rounds]


def _steps(run_id: str, key: str = "accuracy") -> list[tuple[int, float]]:
    return sorted((int(m.step), float(m.value)) for m in mlflow.MlflowClient().get_metric_history(run_id, key))


# ------------------------------------------------------------------------------------------------ statuses
def test_a_run_is_running_during_its_rounds_and_finished_only_at_the_end(cfg: MlflowConfig, tmp_path: Path) -> None:
    tracker = FederateTracker(cfg, tmp_path, model_spec=SPEC)
    run_id = tracker.start({"federation.rounds": 3})
    parent = mlflow.MlflowClient().get_run(run_id).data.tags["mlflow.parentRunId"]
    model = build(SPEC)
    for server_round in (1, 2, 3):
        tracker.log_round(server_round, {"accuracy": 0.1 * server_round}, model if server_round != 2 else None,
                          (1, 4, 5))
        assert _status(run_id) == "RUNNING"  # logging a round (and its model) leaves the run open
        assert _status(parent) == "RUNNING"  # the stage's own parent too
    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    assert tags[OWNER_PID] == str(os.getpid()) and tags[OWNER_HOST] == owner_tags()[OWNER_HOST]
    tracker.finish({"accuracy": 0.3}, 3, [])
    assert (_status(run_id), _status(parent)) == ("FINISHED", "FINISHED")


@pytest.mark.parametrize(("error", "status"), [
    (ValueError("bad input"), "FAILED"),
    (KeyboardInterrupt(), "KILLED"),
    (SystemExit(143), "KILLED"),
])
def test_a_stage_that_stops_early_leaves_its_run_failed_or_killed(cfg: MlflowConfig, tmp_path: Path,
                                                                  error: BaseException, status: str) -> None:
    tracker = FederateTracker(cfg, tmp_path, model_spec=SPEC)
    run_id = tracker.start({})
    parent = mlflow.MlflowClient().get_run(run_id).data.tags["mlflow.parentRunId"]
    tracker.log_round(1, {"accuracy": 0.1}, None, (1, 4, 5))
    try:
        raise error
    except BaseException:  # what every stage's round loop does
        assert tracker.fail() == status
    assert (_status(run_id), _status(parent)) == (status, status)
    reason = mlflow.MlflowClient().get_run(run_id).data.tags[END_REASON]
    assert reason.startswith(type(error).__name__)


def test_prefect_termination_is_killed() -> None:
    from prefect.exceptions import TerminationSignal

    assert run_status(TerminationSignal(signal.SIGTERM)) == "KILLED"
    assert run_status(RuntimeError("x")) == "FAILED"
    assert run_status(None) == "FINISHED"


def test_fail_never_masks_the_stage_error(cfg: MlflowConfig, tmp_path: Path) -> None:
    tracker = FederateTracker(cfg, tmp_path, model_spec=SPEC)
    tracker.start({})
    tracker.run_id = "0" * 32  # a run the store does not hold (e.g. its store was deleted meanwhile)
    try:
        raise ValueError("the stage's own error")
    except ValueError:
        assert tracker.fail() == "FAILED"  # logged, not raised


# ------------------------------------------------------------------------------------------------ killed processes
_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fedcore.config import MlflowConfig
    from tasks.tracking import FederateTracker
    cfg = MlflowConfig(tracking_uri=sys.argv[1], experiment="state")
    tracker = FederateTracker(cfg, Path(sys.argv[2]))
    run_id = tracker.start({"federation.rounds": 8})
    for server_round in (1, 2, 3):
        tracker.log_round(server_round, {"accuracy": server_round / 10}, None, (1, 4, 5))
    print(run_id, flush=True)
    time.sleep(120)
""")


def test_a_run_whose_process_was_killed_is_marked_killed_by_the_next_start(cfg: MlflowConfig,
                                                                            tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, cfg.tracking_uri, str(tmp_path)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout is not None
        run_id = child.stdout.readline().strip()
        assert run_id, "the child did not start its run"
        FederateTracker(cfg, tmp_path)  # the owner is alive: its run is left alone
        assert _status(run_id) == "RUNNING"
    finally:
        child.send_signal(signal.SIGKILL)  # no handler, no cleanup: the run stays RUNNING
        child.wait(timeout=30)
    assert _status(run_id) == "RUNNING"
    parent = mlflow.MlflowClient().get_run(run_id).data.tags["mlflow.parentRunId"]

    tracker = FederateTracker(cfg, tmp_path, model_spec=SPEC)  # the next start of any stage against the store
    assert (_status(run_id), _status(parent)) == ("KILLED", "KILLED")
    assert "killed" in mlflow.MlflowClient().get_run(run_id).data.tags[END_REASON]
    assert _steps(run_id) == [(1, 0.1), (2, 0.2), (3, 0.3)]  # 3 of 8 rounds, and it says so: KILLED

    assert tracker.start({"federation.rounds": 8}, resume_run_id=run_id) == run_id  # resumed from its checkpoint
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "RUNNING" and END_REASON not in run.data.tags
    assert run.data.tags[OWNER_PID] == str(os.getpid())
    assert _status(parent) == "RUNNING"
    tracker.finish({}, 8, [])
    assert (_status(run_id), _status(parent)) == ("FINISHED", "FINISHED")


def _run_owned_by(cfg: MlflowConfig, tmp_path: Path, **tags: str) -> str:
    tracker = FederateTracker(cfg, tmp_path, model_spec=SPEC)
    run_id = tracker.start({})
    for key, value in tags.items():
        mlflow.MlflowClient().set_tag(run_id, key, value)
    return run_id


def test_which_orphans_are_reaped(cfg: MlflowConfig, tmp_path: Path) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    dead_pid = ended.stdout.strip()  # that process has exited
    mine = owner_tags()
    dead = _run_owned_by(cfg, tmp_path, **{OWNER_PID: dead_pid})
    reused = _run_owned_by(cfg, tmp_path, **{OWNER_STARTED: str(float(mine[OWNER_STARTED]) - 3600)})  # pid reused
    elsewhere = _run_owned_by(cfg, tmp_path, **{OWNER_HOST: "another-host", OWNER_PID: dead_pid})
    alive = _run_owned_by(cfg, tmp_path)
    client = mlflow.MlflowClient()
    legacy = client.create_run(client.get_experiment_by_name("state").experiment_id).info.run_id  # no owner tags
    FederateTracker(cfg, tmp_path)
    assert [_status(r) for r in (dead, reused, elsewhere, alive, legacy)] == [
        "KILLED", "KILLED", "RUNNING", "RUNNING", "RUNNING"]


def test_the_pipeline_parent_run_is_killed_when_interrupted(cfg: MlflowConfig, tmp_path: Path) -> None:
    parent = start_parent_run(cfg, tmp_path, {"a": 1})
    assert _status(parent) == "RUNNING"
    assert mlflow.MlflowClient().get_run(parent).data.tags[OWNER_PID] == str(os.getpid())
    error = KeyboardInterrupt()
    end_run(parent, run_status(error), error)
    assert _status(parent) == "KILLED"
    assert mlflow.MlflowClient().get_run(parent).data.tags[END_REASON] == "KeyboardInterrupt"


# ------------------------------------------------------------------------------------------------ backfill
def test_backfill_restores_the_rounds_the_store_lost(cfg: MlflowConfig, tmp_path: Path) -> None:
    tracker = FederateTracker(cfg, tmp_path, model_spec=SPEC)
    run_id = tracker.start({})
    model = build(SPEC)
    for row in _history(range(5, 9)):  # the store holds rounds 5-8 only (rounds 1-4 lost)
        tracker.log_round(int(row["round"]), {k: v for k, v in row.items() if k != "round"},
                          model if row["round"] == 8 else None, (1, 4, 5))
    tracker.fail(KeyboardInterrupt())

    again = FederateTracker(cfg, tmp_path, model_spec=SPEC)
    again.start({}, resume_run_id=run_id)
    assert again.backfill(_history(range(1, 9))) == [1, 2, 3, 4]
    assert _steps(run_id) == [(r, r / 10) for r in range(1, 9)]
    assert _steps(run_id, "loss") == [(r, 1.0 / r) for r in range(1, 9)]
    assert again.backfill(_history(range(1, 9))) == []  # nothing twice
    assert _steps(run_id) == [(r, r / 10) for r in range(1, 9)]
    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    assert tags[BACKFILLED] == "1-4"
    assert "models are not in this run" in tags[MODELS_NOT_RESTORED]
    assert again.finish({}, 8, []) == 1  # the final round's model (logged before the kill) is registered


@pytest.mark.parametrize("gone", ["deleted", "other store"])
def test_backfill_fills_a_new_run_when_the_old_one_is_gone(cfg: MlflowConfig, tmp_path: Path, gone: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = FederateTracker(cfg, tmp_path, model_spec=SPEC)
    old = tracker.start({})
    for row in _history(range(1, 4)):
        tracker.log_round(int(row["round"]), {"accuracy": row["accuracy"]}, None, (1, 4, 5))
    tracker.fail(KeyboardInterrupt())
    if gone == "deleted":
        mlflow.MlflowClient().delete_run(old)
    else:  # the store was deleted between the kill and the resume: an empty one takes its place
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'fresh.db'}")

    again = FederateTracker(cfg, tmp_path, model_spec=SPEC)
    new = again.start({}, resume_run_id=old)
    assert new != old and again.restored_from == old
    assert again.backfill(_history(range(1, 9))) == list(range(1, 9))
    assert _steps(new) == [(r, r / 10) for r in range(1, 9)]
    tags = mlflow.MlflowClient().get_run(new).data.tags
    assert tags[RESTORED_FROM] == old and tags[BACKFILLED] == "1-8"
    assert _status(new) == "RUNNING"


def test_backfill_is_cheap_when_nothing_is_missing(cfg: MlflowConfig, tmp_path: Path) -> None:
    tracker = FederateTracker(cfg, tmp_path, model_spec=SPEC)
    run_id = tracker.start({})
    tracker.log_round(1, {"accuracy": 0.1}, build(SPEC, torch.Generator().manual_seed(1)), (1, 4, 5))
    assert tracker.backfill(_history(range(1, 2))) == []
    assert BACKFILLED not in mlflow.MlflowClient().get_run(run_id).data.tags
