"""The round loop with the early-exit plan: kill/resume bit-identity (FedAvg and FedAdam servers), NaN screening."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcore.algorithms.base import ClientData
from fedcore.config import Params, load_params
from fedcore.data.federated import FederatedDataset
from fedcore.errors import ConfigError
from fedcore.federation.checkpoint import Checkpointer
from fedcore.federation.engine import Callback, Plateau, Run, SerialExecutor, run_rounds
from fedcore.plans.earlyexit import EarlyExitPlan, run_fingerprint
from tests.fedcore.test_engine import Kill, assert_same_run, synthetic_data, without_timings

TIERS = [{"share": 0.25, "depth": 1}, {"share": 0.25, "depth": 2}, {"share": 0.5, "depth": 3}]


def small_params(**sections: dict[str, Any]) -> Params:
    """A tiny transformer (width 8, 3 layers, exits after each), 4 clients in three budget tiers."""
    raw: dict[str, dict[str, Any]] = {
        "model": {"name": "transformer", "width": 8, "depth": 3},
        "federation": {"rounds": 4, "batch_size": 8, "lr": 0.05, "client_fraction": 0.75, "seed": 3},
        "partition": {"num_clients": 4},
        "earlyexit": {"exits": [1, 2, 3], "tiers": TIERS},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return load_params(raw)


def build(params: Params, data: FederatedDataset, folder: Path) -> tuple[EarlyExitPlan, Checkpointer]:
    """Every object rebuilt from params and disk, as a restarted process would."""
    return EarlyExitPlan(params, data), Checkpointer(folder, run_fingerprint(params, "synthetic"))


def run_plan(params: Params, data: FederatedDataset, folder: Path, callbacks: tuple[Callback, ...] = ()) -> Run:
    plan, checkpointer = build(params, data, folder)
    return run_rounds(plan, SerialExecutor(), checkpointer, callbacks, client_threads=1, server_threads=1)


@pytest.mark.parametrize("earlyexit", [
    pytest.param({"server": "fedadam", "weighting": "depth"}, id="fedadam"),
    pytest.param({"server": "fedavg", "deep_supervision": True}, id="fedavg"),
])
def test_a_killed_early_exit_run_resumes_bit_for_bit(tmp_path: Path, earlyexit: dict[str, Any]) -> None:
    params, data = small_params(earlyexit=earlyexit), synthetic_data()
    whole = run_plan(params, data, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run_plan(params, data, tmp_path / "cut", (Kill(at=3),))
    resumed = run_plan(params, data, tmp_path / "cut")
    assert resumed.resumed and resumed.start_round == 2
    assert_same_run(whole, resumed)
    assert len(whole.history) == params.federation.rounds
    # clients of every tier trained, shallow ones on less compute per example
    depths = {int(d) for record in whole.records for d in record["depths"].values()}
    assert depths == {1, 2, 3}
    per_example = {t: row[f"tier{t}_mflops_per_example"] for row in whole.history for t in depths
                   if f"tier{t}_mflops_per_example" in row}
    assert per_example[1] < per_example[2] < per_example[3]
    row = whole.history[-1]
    assert {"exit1_accuracy", "exit3_accuracy", "val_exit3_accuracy", "client_gflops_mean"} <= row.keys()


def test_forgetting_the_server_moments_would_be_detected(tmp_path: Path) -> None:
    """Without FedAdam's moments in the checkpoint the resumed run would differ: check the test above can tell."""
    params, data = small_params(earlyexit={"server": "fedadam"}), synthetic_data()
    whole = run_plan(params, data, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run_plan(params, data, tmp_path / "cut", (Kill(at=3),))
    plan, checkpointer = build(params, data, tmp_path / "cut")
    assert plan.server.state_dict() == {}  # a fresh server: nothing restored yet
    plan.stateful = lambda: {}  # type: ignore[method-assign]  # forget the moments on resume
    forgot = run_rounds(plan, SerialExecutor(), checkpointer, client_threads=1, server_threads=1)
    assert forgot.resumed and forgot.start_round == 2
    assert without_timings(forgot.history) != without_timings(whole.history)


def test_a_nan_update_is_rejected_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedcore.plans.earlyexit as plans

    original = plans.train_exit_job
    params, data = small_params(federation={"client_fraction": 1.0, "rounds": 3}), synthetic_data()

    def poisoned(spec: Any, client_id: int, server_round: int, *args: Any) -> Any:
        update = original(spec, client_id, server_round, *args)
        if client_id == 1 and server_round == 2:
            key = next(k for k in update.state if update.state[k].is_floating_point())
            update.state[key] = torch.full_like(update.state[key], float("nan"))
        return update

    monkeypatch.setattr(plans, "train_exit_job", poisoned)
    run = run_plan(params, data, tmp_path)
    assert [row["num_rejected"] for row in run.history] == [0.0, 1.0, 0.0]
    assert [row["num_clients"] for row in run.history] == [4.0, 3.0, 4.0]
    assert run.records[1]["failed"] == [] and "finite" in run.records[1]["rejected"]["1"]
    assert all(bool(torch.isfinite(v).all()) for v in run.state.values() if v.is_floating_point())
    assert all(math.isfinite(v) for row in run.history for v in row.values())


def test_a_client_whose_loss_goes_nan_fails_alone(tmp_path: Path) -> None:
    params, data = small_params(federation={"client_fraction": 1.0, "rounds": 2}), synthetic_data()
    bad = data.train[2]
    data.train[2] = ClientData(torch.full_like(bad.features, float("nan")), bad.labels)  # type: ignore[index]
    run = run_plan(params, data, tmp_path)
    assert [row["num_failed"] for row in run.history] == [1.0, 1.0]
    assert [row["num_clients"] for row in run.history] == [3.0, 3.0]
    assert "FloatingPointError" in run.records[0]["rejected"]["2"]
    assert all(bool(torch.isfinite(v).all()) for v in run.state.values() if v.is_floating_point())


def test_a_plateau_of_the_last_exits_validation_accuracy_stops_the_run(tmp_path: Path) -> None:
    # min_gain 1.0: no round can gain a whole accuracy, so the rule stops as soon as it may (round patience + 1)
    params = small_params(earlyexit={"stop": "plateau", "plateau_min_gain": 1.0, "plateau_patience": 2})
    plan, _ = build(params, synthetic_data(), tmp_path / "probe")
    assert plan.stop_rule == Plateau("val_exit3_accuracy", 1.0, 2)  # the last exit's validation accuracy
    run = run_plan(params, synthetic_data(), tmp_path / "run")
    assert run.stop is not None and (run.stop.reason, run.stop.round) == ("plateau", 3)
    assert "val_exit3_accuracy" in run.stop.detail
    assert [int(row["round"]) for row in run.history] == [1, 2, 3]  # params.federation.rounds (4) is the cap
    every = run_plan(small_params(earlyexit={"stop": "rounds"}), synthetic_data(), tmp_path / "every")
    assert every.stop is not None and every.stop.reason == "rounds" and len(every.history) == 4
    assert without_timings(every.history[:3]) == without_timings(run.history)  # the rule only ends the run


def test_a_killed_run_with_a_plateau_rule_resumes_to_the_same_stop(tmp_path: Path) -> None:
    params = small_params(earlyexit={"server": "fedadam", "plateau_min_gain": 1.0, "plateau_patience": 2})
    data = synthetic_data()
    whole = run_plan(params, data, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run_plan(params, data, tmp_path / "cut", (Kill(at=3),))
    resumed = run_plan(params, data, tmp_path / "cut")
    assert resumed.resumed and resumed.start_round == 2
    assert_same_run(whole, resumed)
    assert resumed.stop == whole.stop and whole.stop is not None and whole.stop.round == 3
    again = run_plan(params, data, tmp_path / "cut")  # a rerun after the stop trains no further round
    assert again.start_round == 3 and again.stop == whole.stop
    assert_same_run(whole, again)


def test_earlyexit_rounds_is_the_cap_over_federation_rounds(tmp_path: Path) -> None:
    params = small_params(earlyexit={"rounds": 2})
    plan, _ = build(params, synthetic_data(), tmp_path)
    assert plan.rounds == 2 and params.federation.rounds == 4


def test_a_plateau_without_held_out_rows_is_refused(tmp_path: Path) -> None:
    data = dataclasses.replace(synthetic_data(), holdout=[None] * 4)
    with pytest.raises(ConfigError, match="holdout_fraction"):
        build(small_params(), data, tmp_path)
    plan, _ = build(small_params(earlyexit={"stop": "rounds"}), data, tmp_path)
    assert plan.stop_rule is None
