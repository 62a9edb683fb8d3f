"""Local training: one loop, algorithm hooks, FedProx limit case and term, determinism, learning progress."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedcore.aggregation import ClientUpdate, StateDict, clone_state
from fedcore.algorithms import (
    LOCAL_ALGORITHMS,
    ClientData,
    FedAvgClient,
    FedProx,
    LocalAlgorithm,
    LocalSettings,
    train_client,
)
from fedcore.config import ModelConfig
from fedcore.evaluation import evaluate
from fedcore.models import build_model

INPUT_SHAPE = (1, 4, 6)


def _toy_data(n: int = 48, seed: int = 0) -> ClientData:
    """Two classes told apart by the sign of the mean of the log-mel patch (linearly separable)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n, dtype=torch.int64) % 2
    features = torch.randn(n, *INPUT_SHAPE, generator=generator) * 0.3
    features += (labels.float() * 2 - 1).view(n, 1, 1, 1)  # class 0 around −1, class 1 around +1
    return ClientData(features=features, labels=labels)


def _model(seed: int = 0) -> nn.Module:
    return build_model(ModelConfig(name="cnn", width=4, depth=2), 2, INPUT_SHAPE, torch.Generator().manual_seed(seed))


def _train(algorithm: LocalAlgorithm, *, seed: int = 5, epochs: int = 2, lr: float = 0.05,
           global_state: StateDict | None = None, data: ClientData | None = None) -> ClientUpdate:
    model = _model()
    state = global_state if global_state is not None else clone_state(model.state_dict())
    return train_client(
        client_id=3, model=model, global_state=state, data=data or _toy_data(), algorithm=algorithm,
        settings=LocalSettings(epochs=epochs, batch_size=8, lr=lr, momentum=0.9, weight_decay=1e-4),
        generator=torch.Generator().manual_seed(seed),
    )


def _equal(a: StateDict, b: StateDict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", [n for n in LOCAL_ALGORITHMS.names() if not LOCAL_ALGORITHMS.get(n).personal])
def test_local_algorithm_builds_from_defaults_and_trains(name: str) -> None:
    algorithm = LOCAL_ALGORITHMS.build(name)
    assert isinstance(algorithm, LocalAlgorithm)
    update = _train(algorithm, epochs=1)
    assert update.client_id == 3 and update.num_examples == 48
    assert set(update.metrics) == {"train_loss", "train_accuracy", "num_batches"}
    assert update.metrics["num_batches"] == 6  # ⌈48 / 8⌉
    assert _equal(update.state, _train(LOCAL_ALGORITHMS.build(name), epochs=1).state)


def test_fedprox_mu_zero_equals_fedavg_bit_for_bit() -> None:
    fedavg, prox = _train(FedAvgClient()), _train(FedProx(mu=0.0))
    assert _equal(fedavg.state, prox.state)
    assert fedavg.metrics == prox.metrics


def test_fedprox_positive_mu_pulls_towards_global_state() -> None:
    global_state = clone_state(_model().state_dict())
    fedavg = _train(FedAvgClient(), global_state=global_state)
    prox = _train(FedProx(mu=1.0), global_state=global_state)

    def distance(state: StateDict) -> float:
        return sum(float((state[k].double() - global_state[k].double()).pow(2).sum())
                   for k in state if state[k].is_floating_point() and "running" not in k)

    assert not _equal(fedavg.state, prox.state)
    assert distance(prox.state) < distance(fedavg.state)


def test_fedprox_extra_loss_equals_hand_computation() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.copy_(torch.tensor([0.5]))
    global_state = {"weight": torch.tensor([[0.0, 1.0]]), "bias": torch.tensor([2.0])}
    # ‖w − w_g‖² = 1² + 3² + 1.5² = 12.25; (μ/2)·12.25 with μ = 0.2 → 1.225 (squared norm, not the norm)
    term = FedProx(mu=0.2).extra_loss(model, global_state)
    assert term is not None
    assert term.item() == pytest.approx(1.225)
    term.backward()
    # gradient μ (w − w_g)
    assert torch.allclose(model.weight.grad, 0.2 * torch.tensor([[1.0, -3.0]]))
    assert torch.allclose(model.bias.grad, torch.tensor([0.2 * -1.5]))


def test_fedprox_extra_loss_skips_frozen_parameters() -> None:
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(10.0)
    model.bias.requires_grad_(False)
    term = FedProx(mu=2.0).extra_loss(model, {"weight": torch.zeros(1, 1), "bias": torch.zeros(1)})
    assert term is not None and term.item() == pytest.approx(9.0)


@pytest.mark.parametrize("mu", [-0.1, math.nan, math.inf])
def test_fedprox_rejects_bad_mu(mu: float) -> None:
    with pytest.raises(ValueError, match="fedprox: 'mu' must be a finite float >= 0"):
        FedProx(mu=mu)


def test_train_client_same_generator_seed_same_update_other_seed_differs() -> None:
    a, b, c = _train(FedAvgClient(), seed=11), _train(FedAvgClient(), seed=11), _train(FedAvgClient(), seed=12)
    assert _equal(a.state, b.state) and a.metrics == b.metrics
    assert not _equal(a.state, c.state)


def test_train_client_lowers_loss_on_separable_data() -> None:
    data = _toy_data()
    model = _model()
    start = clone_state(model.state_dict())
    before = evaluate(model, data.features, data.labels, batch_size=64)["loss"]
    update = _train(FedAvgClient(), epochs=5, global_state=start, data=data)
    model.load_state_dict(update.state)
    after = evaluate(model, data.features, data.labels, batch_size=64)
    assert after["loss"] < before * 0.5
    assert after["accuracy"] > 0.9
    assert update.metrics["train_accuracy"] > 0.9


def test_train_client_returns_detached_cpu_copies_and_keeps_global_state() -> None:
    model = _model()
    global_state = clone_state(model.state_dict())
    snapshot = clone_state(global_state)
    update = train_client(
        client_id=0, model=model, global_state=global_state, data=_toy_data(), algorithm=FedAvgClient(),
        settings=LocalSettings(epochs=1, batch_size=16, lr=0.1, momentum=0.0, weight_decay=0.0),
        generator=torch.Generator().manual_seed(0),
    )
    assert _equal(global_state, snapshot)
    assert not _equal(update.state, global_state)
    for key, tensor in update.state.items():
        assert tensor.device.type == "cpu" and not tensor.requires_grad
        assert tensor.untyped_storage().data_ptr() != model.state_dict()[key].untyped_storage().data_ptr()
    # BatchNorm buffers are trained and returned too
    assert update.state["features.0.1.num_batches_tracked"].item() == 3


def test_train_client_metrics_are_sample_weighted_over_last_epoch() -> None:
    class Constant(nn.Module):
        """Logits that favour class 0 by a fixed margin; one dummy parameter so SGD has something to step."""

        def __init__(self) -> None:
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([2.0, 0.0]).expand(x.shape[0], 2) + 0 * self.dummy

    data = ClientData(features=torch.zeros(5, 1, 2, 2), labels=torch.tensor([0, 0, 0, 1, 1]))
    update = train_client(
        client_id=1, model=Constant(), global_state={"dummy": torch.zeros(1)}, data=data, algorithm=FedAvgClient(),
        settings=LocalSettings(epochs=2, batch_size=2, lr=0.1, momentum=0.0, weight_decay=0.0),
        generator=torch.Generator().manual_seed(0),
    )
    loss_0, loss_1 = math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(2.0))
    assert update.metrics["train_loss"] == pytest.approx((3 * loss_0 + 2 * loss_1) / 5)
    assert update.metrics["train_accuracy"] == pytest.approx(3 / 5)
    assert update.metrics["num_batches"] == 6  # 3 batches (2, 2, 1) per epoch × 2 epochs


def test_train_client_after_step_hook_runs_every_step() -> None:
    class Counting(LocalAlgorithm):
        def __init__(self) -> None:
            self.steps = 0

        def after_step(self, model: nn.Module) -> None:
            self.steps += 1

    algorithm = Counting()
    update = _train(algorithm, epochs=2)
    assert algorithm.steps == update.metrics["num_batches"] == 12


def test_train_client_non_finite_loss_raises_with_client_id() -> None:
    data = _toy_data()
    data.features[0, 0, 0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="client 3: the training loss must be finite"):
        _train(FedAvgClient(), data=data)


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"epochs": 0}, "'epochs' must be an int >= 1"), ({"batch_size": 0}, "'batch_size' must be an int >= 1"),
     ({"lr": 0.0}, "'lr' must be a finite float > 0"), ({"momentum": 1.0}, r"'momentum' must be in \[0, 1\)"),
     ({"weight_decay": -1.0}, "'weight_decay' must be a finite float >= 0")],
)
def test_train_client_rejects_bad_hyperparameters(changes: dict[str, float], match: str) -> None:
    model = _model()
    settings = dict(epochs=1, batch_size=8, lr=0.1, momentum=0.0, weight_decay=0.0)
    settings.update(changes)
    with pytest.raises(ValueError, match=match):
        train_client(client_id=0, model=model, global_state=model.state_dict(), data=_toy_data(),
                     algorithm=FedAvgClient(), settings=LocalSettings(**settings),  # type: ignore[arg-type]
                     generator=torch.Generator())


@pytest.mark.parametrize(
    ("features", "labels", "match"),
    [(torch.zeros(4, 2, 3, 3), torch.zeros(4, dtype=torch.int64), "'features' must be"),
     (torch.zeros(4, 1, 3, 3), torch.zeros(4, dtype=torch.int32), "'labels' must be"),
     (torch.zeros(4, 1, 3, 3), torch.zeros(3, dtype=torch.int64), "one entry per feature row"),
     (torch.zeros(0, 1, 3, 3), torch.zeros(0, dtype=torch.int64), "one entry per feature row")],
)
def test_client_data_rejects_bad_tensors(features: torch.Tensor, labels: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ClientData(features=features, labels=labels)
