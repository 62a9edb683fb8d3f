"""What is sent (parameter groups) and FedU's divergence-aware predictor update."""

from __future__ import annotations

import pytest
import torch

from fedcore.algorithms import LOCAL_ALGORITHMS
from fedcore.algorithms.fedu import encoder_divergence
from fedcore.config import ModelConfig
from fedcore.models import build_model
from fedcore.models.groups import PARAM_GROUPS


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(ModelConfig(name="cnn", width=4, depth=2), 5, (1, 16, 20), torch.Generator().manual_seed(0))


def test_groups_partition_the_state_dict(model: torch.nn.Module) -> None:
    keys = list(model.state_dict())
    everything = PARAM_GROUPS.build("all").keys(model)
    backbone = PARAM_GROUPS.build("backbone").keys(model)
    head = PARAM_GROUPS.build("head").keys(model)
    assert everything == keys
    assert head == ["classifier.weight", "classifier.bias"]
    assert sorted(backbone + head) == sorted(keys) and not set(backbone) & set(head)


def test_a_model_can_name_its_own_head_and_an_empty_group_is_an_error(model: torch.nn.Module) -> None:
    class Named(torch.nn.Module):
        head_modules = ("out",)

        def __init__(self) -> None:
            super().__init__()
            self.body, self.out = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)

    assert PARAM_GROUPS.build("head").keys(Named()) == ["out.weight", "out.bias"]
    only_head = torch.nn.Module()
    only_head.classifier = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="selects no entry"):
        PARAM_GROUPS.build("backbone").keys(only_head)


def _shifted(state: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    return {k: (v + by if v.is_floating_point() else v) for k, v in state.items()}


def test_divergence_is_the_mean_norm_over_weight_tensors() -> None:
    g = {"conv.weight": torch.zeros(2, 2), "conv.bias": torch.zeros(2), "fc.weight": torch.zeros(1, 4)}
    local = {"conv.weight": torch.full((2, 2), 1.0), "conv.bias": torch.full((2,), 9.0),
             "fc.weight": torch.zeros(1, 4)}
    # ‖1‖ over 4 values = 2 for conv.weight, 0 for fc.weight; the bias (rank 1) is not counted.
    assert encoder_divergence(g, local, list(g)) == pytest.approx(1.0)


def test_fedu_keeps_the_local_predictor_only_when_the_encoder_diverged(model: torch.nn.Module) -> None:
    fedu = LOCAL_ALGORITHMS.build("fedu", mu=0.4, mu_scale="absolute", predictor="head")  # the paper's rule
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fedu.start_state(global_state, None, model) is global_state  # first round: global
    near = {k: v.clone() for k, v in global_state.items()}
    near["classifier.weight"] = near["classifier.weight"] + 5.0  # local predictor differs, encoder the same
    start = fedu.start_state(global_state, near, model)
    assert torch.equal(start["classifier.weight"], global_state["classifier.weight"])  # D = 0 < μ: global
    far = _shifted(near, 3.0)  # encoder far away: D >= μ
    start = fedu.start_state(global_state, far, model)
    assert torch.equal(start["classifier.weight"], far["classifier.weight"])  # local predictor kept
    assert torch.equal(start["features.0.0.weight"], global_state["features.0.0.weight"])  # encoder always global
    with pytest.raises(ValueError, match="mu"):
        LOCAL_ALGORITHMS.build("fedu", mu=-1.0)
