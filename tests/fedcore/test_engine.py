"""The round loop (fedcore.federation.engine) with the supervised plan: kill/resume bit-identity, failure policy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcore.algorithms.base import ClientData
from fedcore.config import Params, load_params
from fedcore.data.federated import FederatedDataset
from fedcore.errors import QuorumError
from fedcore.federation.checkpoint import Checkpointer
from fedcore.federation.engine import Callback, Job, RoundResult, Run, SerialExecutor, gather_updates, run_rounds
from fedcore.plans.supervised import SupervisedPlan, make_spec, run_fingerprint

SHAPE = (1, 12, 12)


def synthetic_data(num_clients: int = 4, per_client: int = 20, num_classes: int = 3) -> FederatedDataset:
    """Class-dependent Gaussian blobs, a few classes per client (non-IID), a held-out split and a test split."""
    g = torch.Generator().manual_seed(7)
    centres = torch.randn(num_classes, *SHAPE, generator=g)

    def draw(labels: torch.Tensor) -> ClientData:
        return ClientData(centres[labels] + 0.8 * torch.randn(len(labels), *SHAPE, generator=g), labels)

    train, holdout = [], []
    for client in range(num_clients):
        labels = torch.tensor([(client + i % 2) % num_classes for i in range(per_client)])
        train.append(draw(labels))
        holdout.append(draw(labels[:6]))
    return FederatedDataset(train, holdout, draw(torch.arange(30) % num_classes), num_classes, SHAPE)


def small_params(**sections: dict[str, Any]) -> Params:
    raw: dict[str, dict[str, Any]] = {
        "model": {"name": "cnn", "width": 4, "depth": 2},
        "federation": {"rounds": 4, "batch_size": 8, "lr": 0.05, "client_fraction": 0.75, "seed": 3},
        "partition": {"num_clients": 4},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return load_params(raw)


class Kill(Callback):
    """Interrupts the run in round ``at``, after the clients trained and before the round's checkpoint."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_round(self, run: Run, server_round: int, row: dict[str, float], record: dict[str, Any],
                 result: RoundResult) -> None:
        if server_round == self.at:
            raise KeyboardInterrupt


def run_supervised(params: Params, data: FederatedDataset, folder: Path,
                   callbacks: tuple[Callback, ...] = ()) -> Run:
    """Build every object from params and disk (as a restarted process would) and run the rounds."""
    spec = make_spec(params, data.num_clients, data.num_classes, data.input_shape, 1)
    plan = SupervisedPlan(params, data, spec, client_folder=folder / "clients")
    checkpointer = Checkpointer(folder, run_fingerprint(spec, "synthetic", params))
    return run_rounds(plan, SerialExecutor(), checkpointer, callbacks, client_threads=1, server_threads=1)


def without_timings(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in history]


def assert_same_run(a: Run, b: Run) -> None:
    assert without_timings(a.history) == without_timings(b.history)
    assert a.records == b.records
    assert a.state.keys() == b.state.keys()
    for key in a.state:
        assert torch.equal(a.state[key], b.state[key]), key


@pytest.mark.parametrize("sections", [
    pytest.param({"federation": {"aggregator": "fedadam"}}, id="fedadam"),
    pytest.param({"federation": {"local_algorithm": "fml"}}, id="fml-client-store"),
    pytest.param({"federation": {"local_algorithm": "fedavg", "send": "backbone"}}, id="kept-head"),
])
def test_a_killed_run_resumes_bit_for_bit(tmp_path: Path, sections: dict[str, Any]) -> None:
    params, data = small_params(**sections), synthetic_data()
    whole = run_supervised(params, data, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run_supervised(params, data, tmp_path / "cut", (Kill(at=3),))
    resumed = run_supervised(params, data, tmp_path / "cut")
    assert resumed.resumed and resumed.start_round == 2
    assert_same_run(whole, resumed)
    assert len(whole.history) == params.federation.rounds


def test_fedadam_moments_are_restored_not_restarted(tmp_path: Path) -> None:
    """Without the moments in the checkpoint the resumed run would differ: check the test can tell."""
    params, data = small_params(federation={"aggregator": "fedadam"}), synthetic_data()
    whole = run_supervised(params, data, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run_supervised(params, data, tmp_path / "cut", (Kill(at=3),))
    spec = make_spec(params, data.num_clients, data.num_classes, data.input_shape, 1)
    plan = SupervisedPlan(params, data, spec, client_folder=tmp_path / "cut" / "clients")
    plan.stateful = lambda: {}  # type: ignore[method-assign]  # forget the moments on resume
    checkpointer = Checkpointer(tmp_path / "cut", run_fingerprint(spec, "synthetic", params))
    forgot = run_rounds(plan, SerialExecutor(), checkpointer, client_threads=1, server_threads=1)
    assert without_timings(forgot.history) != without_timings(whole.history)


def test_a_failing_client_is_rejected_and_the_round_goes_on(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import fedcore.plans.supervised as supervised

    original = supervised.train_client

    def failing(spec: Any, client_id: int, *args: Any) -> Any:
        if client_id == 1:
            raise OSError("disk of client 1 on fire")
        return original(spec, client_id, *args)

    monkeypatch.setattr(supervised, "train_client", failing)
    params = small_params(federation={"client_fraction": 1.0, "rounds": 2})
    run = run_supervised(params, synthetic_data(), tmp_path)
    assert [row["num_failed"] for row in run.history] == [1.0, 1.0]
    assert [row["num_clients"] for row in run.history] == [3.0, 3.0]
    assert "disk of client 1 on fire" in run.records[0]["rejected"]["1"]


def test_below_the_quorum_the_round_is_not_applied_and_the_checkpoint_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedcore.plans.supervised as supervised

    original = supervised.train_client

    def failing(spec: Any, client_id: int, server_round: int, *args: Any) -> Any:
        if server_round == 2 and client_id != 0:
            raise OSError("network down")
        return original(spec, client_id, server_round, *args)

    monkeypatch.setattr(supervised, "train_client", failing)
    params = small_params(federation={"client_fraction": 1.0, "rounds": 3, "min_accepted": 0.5})
    with pytest.raises(QuorumError, match="round 2 .*checkpoint of round 1"):
        run_supervised(params, synthetic_data(), tmp_path)
    assert Checkpointer(tmp_path, "x").kept_rounds() == [1]


def test_gather_keeps_client_order_and_turns_errors_into_failures() -> None:
    def job(value: int) -> Callable[[], Any]:
        def fn() -> Any:
            if value < 0:
                raise ValueError("bad")
            return type("U", (), {"client_id": value})()
        return fn

    executor = SerialExecutor()
    results = [(c, executor.submit(Job(c, 1, job(v), ()))) for c, v in ((2, 2), (0, 0), (1, -1))]
    updates, failed = gather_updates(results)
    assert [u.client_id for u in updates] == [0, 2]
    assert failed == {1: "training raised ValueError: bad"}


def test_an_interrupt_in_a_job_is_not_a_client_failure() -> None:
    def interrupted() -> Any:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        SerialExecutor().submit(Job(0, 1, interrupted, ()))


def test_mutual_learning_trains_a_personal_model_apart_from_the_shared_one(tmp_path: Path) -> None:
    """Same architecture for both (the default): still two models, so what a client keeps is not what it sends."""
    params = small_params(federation={"local_algorithm": "fml", "rounds": 1, "client_fraction": 1.0})
    run = run_supervised(params, synthetic_data(), tmp_path)
    spec = make_spec(params, 4, 3, SHAPE, 1)
    assert spec.personal_models == (spec.model,)
    store = SupervisedPlan(params, synthetic_data(), spec, client_folder=tmp_path / "clients").client_store
    assert store is not None
    kept = store.load(0, 1)
    assert kept is not None
    personal = {k[len("personal/"):]: v for k, v in kept[0].items() if k.startswith("personal/")}
    assert personal.keys() == run.state.keys()
    assert any(not torch.equal(personal[k], run.state[k]) for k in personal if personal[k].is_floating_point())
    assert run.history[0]["personal_train_loss_mean"] != run.history[0]["train_loss_mean"]
