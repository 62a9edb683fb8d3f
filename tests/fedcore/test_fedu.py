"""FedU with BYOL: the divergence D_k (relative and absolute), the predictor group, the rule, its metrics, params."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fedcore.aggregation.base import ClientUpdate
from fedcore.algorithms import LOCAL_ALGORITHMS
from fedcore.algorithms.base import ClientData, ClientJob, LocalSettings
from fedcore.algorithms.fedu import FedU, encoder_divergence
from fedcore.config import ModelConfig, load_params
from fedcore.errors import ConfigError
from fedcore.models import build_model
from fedcore.models.groups import PARAM_GROUPS
from fedcore.plans.supervised import client_means
from fedcore.ssl.methods import build_method

SHAPE = (1, 16, 20)


@pytest.fixture(scope="module")
def byol() -> Any:
    return build_method("byol", {"projector_dim": 8, "hidden_dim": 8})


@pytest.fixture()
def byol_model(byol: Any) -> torch.nn.Module:
    return byol.build_model(ModelConfig(name="cnn", width=4, depth=2), 1, SHAPE, torch.Generator().manual_seed(0))


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


# ------------------------------------------------------------------------------------------------ D_k by hand
def test_divergence_by_hand_in_both_scales() -> None:
    g = {"a.weight": torch.tensor([[3.0, 4.0]]),            # ‖W_g‖ = 5
         "b.weight": torch.tensor([[0.0, 2.0], [0.0, 0.0]]),  # ‖W_g‖ = 2
         "a.bias": torch.tensor([1.0]),                       # rank 1: not counted
         "n.num_batches_tracked": torch.tensor(3)}            # not floating: not counted
    k = {"a.weight": torch.tensor([[0.0, 0.0]]),             # ‖ΔW‖ = 5
         "b.weight": torch.tensor([[0.0, 2.0], [0.0, 1.0]]),  # ‖ΔW‖ = 1
         "a.bias": torch.tensor([100.0]), "n.num_batches_tracked": torch.tensor(9)}
    keys = list(g)
    assert encoder_divergence(g, k, keys, "absolute") == pytest.approx((5.0 + 1.0) / 2)
    assert encoder_divergence(g, k, keys, "relative") == pytest.approx((5.0 / 5.0 + 1.0 / 2.0) / 2)
    assert encoder_divergence(g, k, keys) == encoder_divergence(g, k, keys, "absolute")  # the function's default
    # A tensor whose global norm is 0 has no relative size: left out of the relative mean only.
    g["z.weight"], k["z.weight"] = torch.zeros(2, 2), torch.ones(2, 2)
    assert encoder_divergence(g, k, list(g), "relative") == pytest.approx(0.75)
    assert encoder_divergence(g, k, list(g), "absolute") == pytest.approx((5.0 + 1.0 + 2.0) / 3)
    assert encoder_divergence(g, k, ["a.bias"], "relative") == 0.0  # nothing counts
    with pytest.raises(ValueError, match="mu_scale"):
        encoder_divergence(g, k, keys, "raw")


def test_relative_divergence_is_scale_free(byol_model: torch.nn.Module) -> None:
    g = _copy(byol_model.state_dict())
    k = {key: (v * 1.1 if v.is_floating_point() else v) for key, v in g.items()}  # every tensor 10% larger
    fedu = FedU(mu=0.0, mu_scale="relative")
    assert fedu.divergence(g, k, byol_model) == pytest.approx(0.1)
    scaled_g = {key: (v * 7.0 if v.is_floating_point() else v) for key, v in g.items()}
    scaled_k = {key: (v * 7.0 if v.is_floating_point() else v) for key, v in k.items()}
    assert fedu.divergence(scaled_g, scaled_k, byol_model) == pytest.approx(0.1)
    absolute = FedU(mu=0.0, mu_scale="absolute")
    assert absolute.divergence(scaled_g, scaled_k, byol_model) == pytest.approx(
        7.0 * absolute.divergence(g, k, byol_model))


# ------------------------------------------------------------------------------------------------ predictor group
def test_the_predictor_group_of_a_byol_model_is_exactly_its_predictor(byol_model: torch.nn.Module) -> None:
    keys = PARAM_GROUPS.build("predictor").keys(byol_model)
    expected = [k for k in byol_model.state_dict() if k.startswith("predictor.")]
    assert keys == expected and expected
    assert not any(k.startswith(("projector.", "backbone.")) for k in keys)
    fedu = FedU(predictor="predictor")
    encoder = [k for k in byol_model.state_dict() if k not in set(fedu.predictor_keys(byol_model,
                                                                                       byol_model.state_dict()))]
    assert any(k.startswith("projector.") for k in encoder)  # the projector is part of the online encoder


def test_the_predictor_group_of_a_supervised_model_is_its_head() -> None:
    model = build_model(ModelConfig(name="cnn", width=4, depth=2), 5, SHAPE, torch.Generator().manual_seed(0))
    assert PARAM_GROUPS.build("predictor").keys(model) == ["classifier.weight", "classifier.bias"]


def test_default_config_builds_fedu_on_byols_predictor() -> None:
    params = load_params({"federation": {"local_algorithm": "fedu"}, "ssl": {"method": "byol"}})
    assert params.fedu.predictor == "predictor" and params.fedu.mu_scale == "relative"
    fedu = LOCAL_ALGORITHMS.build("fedu", mu=params.fedu.mu, mu_scale=params.fedu.mu_scale,
                                  predictor=params.fedu.predictor)
    assert isinstance(fedu, FedU) and fedu.mu == params.fedu.mu


# ------------------------------------------------------------------------------------------------ the rule
def _diverged(state: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """The encoder (backbone, projector) scaled by ``factor``; the predictor replaced by a distinct one."""
    out = {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = value.clone()
        elif key.startswith("predictor."):
            out[key] = value + 1.0
        else:
            out[key] = value * factor
    return out


@pytest.mark.parametrize("scale", ["relative", "absolute"])
def test_a_client_keeps_its_local_predictor_only_above_mu(byol_model: torch.nn.Module, scale: str) -> None:
    g = _copy(byol_model.state_dict())
    local = _diverged(g, 1.2)  # relative D_k = 0.2 on every weight tensor
    d = FedU(mu_scale=scale).divergence(g, local, byol_model)
    if scale == "relative":
        assert d == pytest.approx(0.2)
    predictor = PARAM_GROUPS.build("predictor").keys(byol_model)
    assert FedU(mu=0.0, mu_scale=scale).start_state(g, None, byol_model) is g  # first round: global
    below = FedU(mu=d * 1.01, mu_scale=scale).start_state(g, local, byol_model)  # D_k < μ: global predictor
    above = FedU(mu=d * 0.99, mu_scale=scale).start_state(g, local, byol_model)  # D_k >= μ: local predictor
    at = FedU(mu=d, mu_scale=scale).start_state(g, local, byol_model)            # D_k = μ: local (strict <)
    for key in predictor:
        assert torch.equal(below[key], g[key])
        assert torch.equal(above[key], local[key]) and torch.equal(at[key], local[key])
    for key in g:  # the encoder (backbone and projector) always starts from the global one
        if key not in predictor:
            assert torch.equal(below[key], g[key]) and torch.equal(above[key], g[key])


def test_fedu_refuses_bad_options() -> None:
    with pytest.raises(ValueError, match="mu"):
        LOCAL_ALGORITHMS.build("fedu", mu=-1.0)
    with pytest.raises(ValueError, match="mu_scale"):
        LOCAL_ALGORITHMS.build("fedu", mu_scale="raw")
    assert repr(FedU(mu=0.1)) == "FedU(mu=0.1, mu_scale='relative', predictor='predictor')"


# ------------------------------------------------------------------------------------------------ metrics
def _job(model: torch.nn.Module, objective: Any, global_state: dict[str, torch.Tensor],
         local_state: dict[str, torch.Tensor] | None) -> ClientJob:
    features = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    return ClientJob(client_id=3, model=model, global_state=global_state, sent_keys=list(global_state),
                     local_state=local_state, data=ClientData(features, torch.zeros(8, dtype=torch.int64)),
                     settings=LocalSettings(epochs=1, batch_size=4, lr=0.01, momentum=0.9, weight_decay=0.0),
                     generator=torch.Generator().manual_seed(2), objective=objective)


def test_run_reports_which_predictor_the_client_started_from(byol: Any, byol_model: torch.nn.Module) -> None:
    g = _copy(byol_model.state_dict())
    local = _diverged(g, 1.2)
    first = FedU(mu=0.1).run(_job(byol_model, byol, g, None))
    assert first.update.metrics["fedu_global_predictor"] == 1.0 and "fedu_divergence" not in first.update.metrics
    assert first.local_state is not None and set(first.update.state) == set(g)  # the client keeps its state
    kept = FedU(mu=0.1).run(_job(byol_model, byol, g, local))  # D_k = 0.2 >= 0.1: local predictor
    assert kept.update.metrics["fedu_global_predictor"] == 0.0
    assert kept.update.metrics["fedu_divergence"] == pytest.approx(0.2)
    took = FedU(mu=0.3).run(_job(byol_model, byol, g, local))  # D_k = 0.2 < 0.3: global predictor
    assert took.update.metrics["fedu_global_predictor"] == 1.0
    assert math.isfinite(took.update.metrics["train_loss"])


def test_round_metrics_hold_the_share_of_clients_on_the_global_predictor() -> None:
    def update(cid: int, **metrics: float) -> ClientUpdate:
        return ClientUpdate(cid, {}, 1, {"train_loss": 1.0, **metrics})

    updates = [update(0, fedu_global_predictor=1.0),  # first round: no divergence
               update(1, fedu_global_predictor=0.0, fedu_divergence=0.3),
               update(2, fedu_global_predictor=1.0, fedu_divergence=0.1),
               update(3, fedu_global_predictor=0.0, fedu_divergence=0.5)]
    means = client_means(updates)
    assert means["fedu_global_predictor_mean"] == pytest.approx(0.5)
    assert means["fedu_divergence_mean"] == pytest.approx(0.3)  # over the clients that report it
    assert client_means([update(0)]) == {}


# ------------------------------------------------------------------------------------------------ params check
@pytest.mark.parametrize("method", ["simclr", "barlow_twins", "acop"])
def test_fedu_over_a_method_without_a_predictor_is_refused(method: str) -> None:
    with pytest.raises(ConfigError, match=r"fedu needs ssl.method byol \(a predictor\) or a supervised model"):
        load_params({"federation": {"local_algorithm": "fedu"}, "ssl": {"method": method}})
    load_params({"federation": {"local_algorithm": "fedavg"}, "ssl": {"method": method}})  # not fedu: fine


def test_fedu_params_accept_byol_and_supervised_and_refuse_bad_values() -> None:
    load_params({"federation": {"local_algorithm": "fedu"}, "ssl": {"method": "byol"}})
    load_params({"federation": {"local_algorithm": "fedu"}, "fedu": {"predictor": "head", "mu_scale": "absolute",
                                                                     "mu": 0.4}})
    with pytest.raises(ConfigError) as error:
        load_params({"fedu": {"mu": -0.1, "mu_scale": "raw", "predictor": "nope"}})
    text = str(error.value)
    assert "fedu: 'mu' must be >= 0.0" in text and "'mu_scale' must be one of 'relative', 'absolute'" in text
    assert "'predictor' must be a registered param_group" in text
