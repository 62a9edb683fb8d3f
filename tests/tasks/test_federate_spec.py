"""The training spec of a run: default aggregator by local algorithm, personal model assignment."""

from __future__ import annotations

from collections import Counter

from fedcore.config import ModelConfig, load_params
from fedcore.plans.supervised import aggregator_name, make_spec


def test_default_aggregator_follows_the_local_algorithm() -> None:
    assert aggregator_name(load_params({"federation": {"local_algorithm": "fedmlac"}})) == "lpa"
    assert aggregator_name(load_params({"federation": {"local_algorithm": "fml"}})) == "fedavg"
    assert aggregator_name(load_params({"federation": {"local_algorithm": "fedmlac", "aggregator": "median"}})) \
        == "median"


def test_spec_assigns_personal_architectures_only_to_rules_that_have_them() -> None:
    models = [{"name": "cnn", "width": 4, "depth": 2}, {"name": "resnet", "width": 4, "depth": 1}]
    params = load_params({"federation": {"local_algorithm": "fedmlac"}, "personal": {"models": models}})
    spec = make_spec(params, 9, 10, (1, 64, 101), 1)
    assert Counter(spec.assignment) == {0: 5, 1: 4} or Counter(spec.assignment) == {0: 4, 1: 5}
    assert {spec.personal_model_config(c) for c in range(9)} == {ModelConfig(**m) for m in models}
    fml = make_spec(load_params({"federation": {"local_algorithm": "fml"}}), 3, 10, (1, 64, 101), 1)
    assert [fml.personal_model_config(c) for c in range(3)] == [fml.model] * 3  # default: the model section's
    assert make_spec(load_params({}), 3, 10, (1, 64, 101), 1).personal_models == ()
