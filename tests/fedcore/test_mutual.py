"""FML / FedMLAC / local-only: losses against hand computations, the client round, model assignment, config."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedcore.aggregation import clone_state
from fedcore.algorithms import (
    LOCAL_ALGORITHMS,
    ClientData,
    ClientJob,
    FedAvgClient,
    FederatedMutualLearning,
    FedMLAC,
    LocalOnly,
    LocalSettings,
    mutual_losses,
    train_client,
)
from fedcore.algorithms.mutual import distillation_kl, join_personal, split_personal
from fedcore.config import ConfigError, ModelConfig, load_params
from fedcore.models import build_model
from fedcore.models.assign import assign_models, personal_generator

INPUT_SHAPE = (1, 4, 6)
SETTINGS = LocalSettings(epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-4)


# ------------------------------------------------------------------------------------------------ hand-computed
def _softmax(row: list[float], t: float) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def _ce(row: list[float], label: int) -> float:
    return -math.log(_softmax(row, 1.0)[label])


def _kl(teacher: list[float], student: list[float], t: float) -> float:
    p, q = _softmax(teacher, t), _softmax(student, t)
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


PERSONAL = [[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-0.7, 1.4, 0.0]]
SHARED = [[0.3, 0.9, -1.2], [1.5, -0.4, 0.8], [0.0, 0.0, 2.2]]
LABELS = [0, 2, 1]


@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 0.5), (0.3, 0.8), (1.0, 0.0)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("t2_scale", [True, False])
def test_mutual_losses_match_a_hand_computation(alpha: float, beta: float, temperature: float,
                                                t2_scale: bool) -> None:
    """α·CE + (1−α)·s·KL, KL summed over classes and averaged over the batch (batchmean), s = T² or 1."""
    scale = temperature**2 if t2_scale else 1.0
    batch = len(LABELS)
    ce_personal = sum(_ce(r, y) for r, y in zip(PERSONAL, LABELS, strict=True)) / batch
    ce_shared = sum(_ce(r, y) for r, y in zip(SHARED, LABELS, strict=True)) / batch
    kl_personal = sum(_kl(m, p, temperature) for m, p in zip(SHARED, PERSONAL, strict=True)) / batch
    kl_shared = sum(_kl(p, m, temperature) for m, p in zip(SHARED, PERSONAL, strict=True)) / batch
    expected_personal = alpha * ce_personal + (1 - alpha) * scale * kl_personal
    expected_shared = beta * ce_shared + (1 - beta) * scale * kl_shared

    got_personal, got_shared = mutual_losses(torch.tensor(PERSONAL, dtype=torch.float64),
                                             torch.tensor(SHARED, dtype=torch.float64), torch.tensor(LABELS),
                                             alpha=alpha, beta=beta, temperature=temperature, t2_scale=t2_scale)
    assert float(got_personal) == pytest.approx(expected_personal, rel=1e-12)
    assert float(got_shared) == pytest.approx(expected_shared, rel=1e-12)


def test_kl_is_batchmean_not_elementwise_mean() -> None:
    """Repeating the batch leaves the loss unchanged, and it is C times the element-wise mean."""
    student, teacher = torch.tensor(PERSONAL), torch.tensor(SHARED)
    once = distillation_kl(student, teacher, 1.0, True)
    twice = distillation_kl(student.repeat(2, 1), teacher.repeat(2, 1), 1.0, True)
    assert torch.allclose(once, twice)
    pointwise = F.kl_div(F.log_softmax(student, 1), F.softmax(teacher, 1), reduction="none")
    assert torch.allclose(once, pointwise.sum() / student.shape[0])
    assert not torch.allclose(once, pointwise.mean())  # not averaged over the classes too


def test_each_partner_is_a_detached_teacher() -> None:
    personal = torch.tensor(PERSONAL, requires_grad=True)
    shared = torch.tensor(SHARED, requires_grad=True)
    loss_personal, loss_shared = mutual_losses(personal, shared, torch.tensor(LABELS), alpha=0.5, beta=0.5)
    (grad_shared,) = torch.autograd.grad(loss_personal, [shared], allow_unused=True)
    (grad_personal,) = torch.autograd.grad(loss_shared, [personal], allow_unused=True)
    assert grad_shared is None and grad_personal is None
    assert torch.autograd.grad(loss_personal, [personal])[0].abs().sum() > 0


def test_identical_outputs_leave_only_the_cross_entropy() -> None:
    logits = torch.tensor(PERSONAL)
    loss_personal, _ = mutual_losses(logits, logits.clone(), torch.tensor(LABELS), alpha=0.25, beta=0.5,
                                     temperature=3.0)
    assert float(loss_personal) == pytest.approx(0.25 * float(F.cross_entropy(logits, torch.tensor(LABELS))),
                                                 abs=1e-6)


# ------------------------------------------------------------------------------------------------ client round
def _data(n: int = 40, seed: int = 0) -> ClientData:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n, dtype=torch.int64) % 3
    features = torch.randn(n, *INPUT_SHAPE, generator=generator) * 0.3 + labels.float().view(n, 1, 1, 1) - 1
    return ClientData(features=features, labels=labels)


def _model(width: int = 4, depth: int = 2, seed: int = 0, name: str = "cnn") -> nn.Module:
    return build_model(ModelConfig(name=name, width=width, depth=depth), 3, INPUT_SHAPE,
                       torch.Generator().manual_seed(seed))


def _job(global_state: dict[str, torch.Tensor], local_state: dict[str, torch.Tensor] | None,
         personal: nn.Module | None, *, seed: int = 5, settings: LocalSettings = SETTINGS) -> ClientJob:
    model = _model()
    return ClientJob(client_id=4, model=model, global_state=global_state, sent_keys=list(global_state),
                     local_state=local_state, data=_data(), settings=settings,
                     generator=torch.Generator().manual_seed(seed), personal_model=personal)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fml_with_pure_cross_entropy_trains_the_shared_model_as_fedavg_does() -> None:
    """β = 1: the shared model's loss is its CE alone, so its update equals FedAvg's client on the same batches."""
    global_state = clone_state(_model(seed=1).state_dict())
    personal = _model(width=8, depth=3, seed=2)
    local = join_personal(clone_state(personal.state_dict()))
    result = FederatedMutualLearning(alpha=0.5, beta=1.0).run(_job(global_state, local, personal))
    fedavg = train_client(client_id=4, model=_model(), global_state=global_state, data=_data(),
                          algorithm=FedAvgClient(), settings=SETTINGS, generator=torch.Generator().manual_seed(5))
    assert _equal(result.update.state, fedavg.state)
    assert result.update.metrics["train_loss"] == pytest.approx(fedavg.metrics["train_loss"])


def test_fml_round_sends_the_shared_model_and_keeps_the_personal_one_with_its_momentum() -> None:
    global_state = clone_state(_model(seed=1).state_dict())
    personal = _model(width=8, depth=3, seed=2)
    start = clone_state(personal.state_dict())
    result = FederatedMutualLearning().run(_job(global_state, join_personal(start), personal))
    assert result.update.state.keys() == global_state.keys() and result.update.num_examples == 40
    assert {"personal_train_loss", "personal_train_accuracy"} <= result.update.metrics.keys()
    kept, buffers = split_personal(result.local_state or {})
    assert kept.keys() == start.keys() and not _equal(kept, start)
    assert buffers.keys() == {name for name, _ in personal.named_parameters()}
    no_momentum = FederatedMutualLearning(keep_optimizer=False).run(
        _job(global_state, join_personal(start), personal))
    assert split_personal(no_momentum.local_state or {})[1] == {}


def test_kept_momentum_changes_the_next_round_and_the_shared_optimiser_starts_fresh() -> None:
    """Round 2 from the same kept weights differs with and without the kept momentum; the shared model's round
    does not depend on the personal optimiser's past except through the personal model's outputs."""
    global_state = clone_state(_model(seed=1).state_dict())
    personal = _model(width=8, depth=3, seed=2)
    first = FederatedMutualLearning().run(_job(global_state, join_personal(clone_state(personal.state_dict())),
                                                personal))
    kept = first.local_state or {}
    weights_only = {k: v for k, v in kept.items() if k.startswith("personal/")}
    with_momentum = FederatedMutualLearning().run(_job(global_state, kept, personal, seed=6))
    without = FederatedMutualLearning().run(_job(global_state, weights_only, personal, seed=6))
    assert not _equal(split_personal(with_momentum.local_state or {})[0],
                      split_personal(without.local_state or {})[0])
    # β = 1 cuts the personal model out of the shared loss: then the shared round is the same either way
    a = FederatedMutualLearning(beta=1.0).run(_job(global_state, kept, personal, seed=6))
    b = FederatedMutualLearning(beta=1.0).run(_job(global_state, weights_only, personal, seed=6))
    assert _equal(a.update.state, b.update.state)


def test_local_only_trains_the_personal_model_alone_and_sends_back_what_it_got() -> None:
    global_state = clone_state(_model(seed=1).state_dict())
    personal = _model(width=8, depth=3, seed=2)
    start = clone_state(personal.state_dict())
    result = LocalOnly().run(_job(global_state, join_personal(start), personal))
    assert _equal(result.update.state, global_state)
    expected = train_client(client_id=4, model=_model(width=8, depth=3), global_state=start, data=_data(),
                            algorithm=FedAvgClient(), settings=SETTINGS, generator=torch.Generator().manual_seed(5))
    assert _equal(split_personal(result.local_state or {})[0], expected.state)
    assert not LocalOnly().has_global_model(True)


def test_fedmlac_is_fml_with_lpa_as_the_server_default() -> None:
    assert FedMLAC.default_aggregator == "lpa" and FederatedMutualLearning.default_aggregator == "fedavg"
    global_state = clone_state(_model(seed=1).state_dict())
    personal = _model(name="resnet", width=2, depth=1, seed=3)  # another architecture than the Plug-in
    local = join_personal(clone_state(personal.state_dict()))
    a = FedMLAC(alpha=0.7, beta=0.4).run(_job(global_state, local, personal))
    b = FederatedMutualLearning(alpha=0.7, beta=0.4).run(_job(global_state, local, personal))
    assert _equal(a.update.state, b.update.state) and _equal(a.local_state or {}, b.local_state or {})


@pytest.mark.parametrize("name", ["fml", "fedmlac", "local"])
def test_personal_rules_refuse_a_job_without_a_personal_model(name: str) -> None:
    rule = LOCAL_ALGORITHMS.build(name)
    global_state = clone_state(_model().state_dict())
    with pytest.raises(ValueError, match="personal model"):
        rule.run(_job(global_state, None, None))
    with pytest.raises(ValueError, match="personal model"):
        rule.personal_state(global_state, None, list(global_state))


@pytest.mark.parametrize(("kwargs", "match"), [({"alpha": 1.5}, "'alpha' must be in"), ({"beta": -0.1}, "'beta'"),
                                               ({"temperature": 0.0}, "'temperature' must be > 0")])
def test_fml_rejects_bad_options(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FederatedMutualLearning(**kwargs)


def test_fml_raises_on_a_non_finite_loss() -> None:
    global_state = clone_state(_model(seed=1).state_dict())
    personal = _model(width=8, depth=3, seed=2)
    job = _job(global_state, join_personal(clone_state(personal.state_dict())), personal)
    job.data.features[0, 0, 0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="client 4: the training loss must be finite"):
        FederatedMutualLearning().run(job)


# ------------------------------------------------------------------------------------------------ assignment
def test_seeded_assignment_is_balanced_deterministic_and_seed_dependent() -> None:
    a = assign_models("seeded", 100, 3, seed=0)
    assert sorted(Counter(a).values()) == [33, 33, 34]
    assert a == assign_models("seeded", 100, 3, seed=0) and a != assign_models("seeded", 100, 3, seed=1)


def test_map_assignment_and_its_errors() -> None:
    assert assign_models("map", 4, 3, mapping={1: 2, 3: 1}) == [0, 2, 0, 1]
    with pytest.raises(ValueError, match="must be in 0..2"):
        assign_models("map", 4, 3, mapping={0: 3})
    with pytest.raises(ValueError, match="Unknown model_assignment"):
        assign_models("round_robin", 4, 3)


def test_personal_initial_weights_differ_per_client_and_repeat_per_seed() -> None:
    cfg = ModelConfig(name="cnn", width=4, depth=2)
    weights = [build_model(cfg, 3, INPUT_SHAPE, personal_generator(0, c)).state_dict()["classifier.weight"]
               for c in (0, 1, 0)]
    assert not torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])


def test_personal_config_reports_every_bad_model_spec_and_map_entry() -> None:
    raw = {"personal": {"models": [{"name": "cnn", "width": 0}, {"name": "nope"}], "assignment": "map",
                        "map": {0: 5}}}
    with pytest.raises(ConfigError) as error:
        load_params(raw)
    text = str(error.value)
    assert "personal: models[0]: 'width' must be >= 1" in text
    assert "personal: models[1]: 'name' must be a registered model" in text
    assert "'map' values must be indices into models, 0..1. Got 5 for client 0" in text
