"""The round loop's stop rule (issue 21): a plateau of a validation metric ends a run before its last round,
deterministically and resume-safely; a plan without a rule runs every round."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from typing_extensions import override

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict
from fedcore.federation.checkpoint import Checkpointer
from fedcore.federation.engine import (
    Callback,
    Job,
    Plan,
    Plateau,
    RoundResult,
    Run,
    SerialExecutor,
    Stop,
    run_rounds,
)
from tests.fedcore.test_engine import Kill


def _step(client: int, server_round: int, value: float) -> ClientUpdate:
    return ClientUpdate(client_id=client, state={"w": torch.full((2,), value)}, num_examples=1, metrics={})


class ScriptedPlan(Plan):
    """One client; the state counts rounds; round r's validation accuracy is ``scores[r - 1]``, its test accuracy
    is made to keep rising (a rule reading it would never stop)."""

    stage = "scripted"

    def __init__(self, scores: Sequence[float], rounds: int, rule: Plateau | None) -> None:
        self.scores, self.rounds, self.stop_rule = list(scores), rounds, rule

    @override
    def initial_state(self) -> StateDict:
        return {"w": torch.zeros(2)}

    @override
    def jobs(self, server_round: int, state: StateDict) -> tuple[list[int], list[Job]]:
        return [0], [Job(0, server_round, _step, (0, server_round, float(state["w"][0]) + 1.0))]

    @override
    def combine(self, state: StateDict, updates: Sequence[ClientUpdate], failed: Mapping[int, str],
                server_round: int, min_accepted: int) -> RoundResult:
        return RoundResult(dict(updates[0].state))

    @override
    def evaluate(self, state: StateDict, server_round: int, result: RoundResult) -> dict[str, float]:
        return {"val_accuracy": self.scores[server_round - 1], "accuracy": server_round / 100.0}


PLATEAU = Plateau("val_accuracy", min_gain=0.005, patience=3)


def run_scripted(scores: Sequence[float], folder: Path, *, rounds: int | None = None, rule: Plateau | None = PLATEAU,
                 callbacks: tuple[Callback, ...] = ()) -> Run:
    """Every object rebuilt (as a restarted process would), the rounds run or resumed from ``folder``."""
    plan = ScriptedPlan(scores, rounds or len(scores), rule)
    return run_rounds(plan, SerialExecutor(), Checkpointer(folder, "scripted"), callbacks, client_threads=1,
                      server_threads=1)


def rows(scores: Sequence[float]) -> list[dict[str, float]]:
    return [{"round": float(r), "val_accuracy": s} for r, s in enumerate(scores, 1)]


# Rounds 1-3 climb; rounds 4-6 add 0.004 over the best before them (0.600): under 0.005, so round 6 stops.
CLIMB_THEN_FLAT = [0.40, 0.50, 0.60, 0.601, 0.604, 0.603, 0.70, 0.80, 0.90, 0.95]


def test_a_plateau_of_the_validation_metric_stops_at_the_hand_computed_round(tmp_path: Path) -> None:
    run = run_scripted(CLIMB_THEN_FLAT, tmp_path)
    assert run.stop is not None and (run.stop.reason, run.stop.round) == ("plateau", 6)
    assert "val_accuracy gained +0.0040 in rounds 4-6" in run.stop.detail
    assert [int(row["round"]) for row in run.history] == [1, 2, 3, 4, 5, 6]  # no row after the stop
    assert float(run.state["w"][0]) == 6.0
    assert Checkpointer(tmp_path, "scripted").kept_rounds()[-1] == 6


def test_the_rule_reads_the_best_of_the_window_against_the_best_before() -> None:
    rule = Plateau("val_accuracy", min_gain=0.01, patience=2)
    # a dip then a recovery to a new best: gain 0.75 - 0.70 = 0.05 over the rounds 3-4, so it goes on
    assert rule(rows([0.6, 0.7, 0.5, 0.75])) is None
    # the window's best (0.705) is only 0.005 above the best before (0.70, round 2)
    stop = rule(rows([0.6, 0.7, 0.69, 0.705]))
    assert stop is not None and (stop.reason, stop.round) == ("plateau", 4)
    # a fall is a negative gain: stop
    assert rule(rows([0.6, 0.7, 0.65, 0.66])) is not None


def test_a_gain_exactly_at_the_threshold_goes_on_and_just_under_it_stops() -> None:
    rule = Plateau("val_accuracy", min_gain=0.25, patience=1)  # binary fractions: exact arithmetic
    assert rule(rows([0.25, 0.5])) is None  # gained exactly 0.25
    assert rule(rows([0.25, 0.4999])) is not None
    # accuracies are ratios: a gain equal to 0.005 up to float rounding still counts (0.105 - 0.1 < 0.005 in floats)
    assert 0.105 - 0.1 < 0.005
    assert Plateau("val_accuracy", min_gain=0.005, patience=1)(rows([0.1, 0.105])) is None


def test_it_never_stops_before_patience_plus_one_rounds(tmp_path: Path) -> None:
    flat = [0.5] * 12
    rule = Plateau("val_accuracy", min_gain=0.005, patience=5)
    assert [rule(rows(flat[:t])) for t in range(1, 6)] == [None] * 5
    stop = rule(rows(flat[:6]))
    assert stop is not None and stop.round == 6
    run = run_scripted(flat, tmp_path, rule=rule)
    assert run.stop is not None and run.stop.round == 6 and len(run.history) == 6


def test_rows_without_the_metric_are_skipped_and_never_stop() -> None:
    rule = Plateau("val_accuracy", min_gain=0.01, patience=1)
    history = [{"round": 1.0, "val_accuracy": 0.5}, {"round": 2.0}]
    assert rule(history) is None  # round 2 is not scored
    assert rule([*history, {"round": 3.0, "val_accuracy": 0.5}]) is not None


def test_rounds_stay_the_cap_and_no_rule_runs_every_round(tmp_path: Path) -> None:
    rising = [0.1 * r for r in range(1, 9)]
    capped = run_scripted(rising, tmp_path / "capped", rounds=5)
    assert capped.stop == Stop("rounds", 5, "ran all 5 rounds") and len(capped.history) == 5
    never = run_scripted([0.5] * 8, tmp_path / "never", rule=None)
    assert never.stop is not None and never.stop.reason == "rounds" and len(never.history) == 8


class Watch(Callback):
    """Records what the callbacks see of the stop in each round."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, Stop | None]] = []

    def on_round(self, run: Run, server_round: int, row: dict[str, float], record: dict[str, Any],
                 result: RoundResult) -> None:
        self.seen.append((server_round, run.stop))


def test_callbacks_see_the_stop_in_the_round_it_ends(tmp_path: Path) -> None:
    watch = Watch()
    run_scripted(CLIMB_THEN_FLAT, tmp_path, callbacks=(watch,))
    assert [r for r, stop in watch.seen if stop is not None] == [6]
    assert [r for r, _ in watch.seen] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("kill_at", [2, 5, 6])
def test_a_killed_run_resumes_to_the_same_stop_round_and_state(tmp_path: Path, kill_at: int) -> None:
    whole = run_scripted(CLIMB_THEN_FLAT, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run_scripted(CLIMB_THEN_FLAT, tmp_path / "cut", callbacks=(Kill(at=kill_at),))
    resumed = run_scripted(CLIMB_THEN_FLAT, tmp_path / "cut")
    assert resumed.resumed and resumed.start_round == kill_at - 1
    assert resumed.stop == whole.stop
    assert [{k: v for k, v in row.items() if "seconds" not in k} for row in resumed.history] == \
        [{k: v for k, v in row.items() if "seconds" not in k} for row in whole.history]
    assert torch.equal(resumed.state["w"], whole.state["w"])


def test_a_run_resumed_after_its_stopping_round_runs_no_further_round(tmp_path: Path) -> None:
    first = run_scripted(CLIMB_THEN_FLAT, tmp_path)
    watch = Watch()
    again = run_scripted(CLIMB_THEN_FLAT, tmp_path, callbacks=(watch,))
    assert again.resumed and again.start_round == 6 and watch.seen == []
    assert again.stop == first.stop and len(again.history) == 6
    assert torch.equal(again.state["w"], first.state["w"])


def test_a_bad_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="patience"):
        Plateau("val_accuracy", patience=0)
