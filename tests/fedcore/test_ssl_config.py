"""The ssl and downstream params sections, and how a run's spec and fingerprint use them."""

from __future__ import annotations

from typing import Any

import pytest

from fedcore.config import DownstreamConfig, DownstreamTaskConfig, Params, SSLConfig, load_params
from fedcore.errors import ConfigError
from fedcore.plans.supervised import make_spec, run_fingerprint

TASK = {"name": "digit", "dataset": "fsdd"}


def _problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_params(raw)
    return info.value.problems


# ------------------------------------------------------------------------------------------------ ssl
def test_defaults_are_valid_and_supervised() -> None:
    params = load_params({})
    assert params.ssl == SSLConfig()
    assert params.ssl.method == "none" and not params.ssl.self_supervised
    assert params.downstream == DownstreamConfig()
    assert params.downstream.tasks == [] and params.downstream.ks == [1, 20]
    assert params.downstream.select_metric == "knn1"
    full = load_params({"ssl": {"method": "byol", "options": {"byol": {"tau": 0.996}},
                                "augment": [{"name": "gain", "p": 0.5}]},
                        "downstream": {"tasks": [TASK, {"name": "who", "dataset": "fsdd", "label": "speaker"}],
                                       "ks": [1, 5], "select_metric": "knn5"}})
    assert full.ssl.self_supervised and full.ssl.method_kwargs()["tau"] == 0.996
    assert [t.label for t in full.downstream.task_configs()] == ["label", "speaker"]
    assert full.downstream.task_configs()[0] == DownstreamTaskConfig(name="digit", dataset="fsdd")


@pytest.mark.parametrize("method", ["simclr", "barlow_twins", "byol", "acop", "none"])
def test_every_registered_method_is_accepted(method: str) -> None:
    assert load_params({"ssl": {"method": method}}).ssl.self_supervised == (method != "none")


def test_unknown_method_lists_the_registered_ones() -> None:
    assert _problems({"ssl": {"method": "moco"}}) == [
        "ssl: 'method' must be a registered ssl_method, one of acop, barlow_twins, byol, none, simclr. Got 'moco'."]


def test_unknown_augmentation_lists_the_registered_ones() -> None:
    (problem,) = _problems({"ssl": {"augment": [{"name": "gain"}, {"name": "reverb", "p": 0.5}]}})
    assert problem.startswith("ssl: 'augment[1].name' must be a registered augmentation, one of ")
    for name in ("freq_mask", "gain", "noise", "time_crop", "time_mask", "time_shift"):
        assert name in problem
    assert problem.endswith("Got 'reverb'.")


@pytest.mark.parametrize("p", [-0.1, 1.5, True, "half"])
def test_augment_probability_must_be_in_the_unit_interval(p: Any) -> None:
    assert _problems({"ssl": {"augment": [{"name": "gain", "p": p}]}}) == [
        f"ssl: 'augment[0].p' must be in [0, 1]. Got {p!r}."]


@pytest.mark.parametrize("p", [0, 0.0, 0.5, 1, 1.0])
def test_augment_probability_bounds_are_accepted(p: float) -> None:
    assert load_params({"ssl": {"augment": [{"name": "noise", "p": p}]}}).ssl.augment == [{"name": "noise", "p": p}]


def test_augment_step_needs_a_name() -> None:
    problems = _problems({"ssl": {"augment": [{"p": 0.5}, "gain"]}})
    assert problems == ["ssl: 'augment[0]' must be a mapping with a 'name'. Got {'p': 0.5}.",
                        "ssl: 'augment[1]' must be a mapping with a 'name'. Got 'gain'."]


@pytest.mark.parametrize(("options", "message"), [
    ({"projector_dim": 0}, "'projector_dim' must be >= 1"),
    ({"hidden_dim": 0}, "'hidden_dim' must be >= 1"),
    ({"options": {"simclr": {"temperature": 0.0}}}, "'options.simclr': simclr: 'temperature' must be a finite "
                                                    "float > 0"),
    ({"options": {"simclr": {"temperature": True}}}, "'options.simclr': simclr: 'temperature' must be"),
    ({"options": {"barlow_twins": {"lambd": -0.1}}}, "'options.barlow_twins': barlow_twins: 'lambd' must be"),
    ({"options": {"acop": {"clips": 1}}}, "'options.acop': acop: 'clips' must be an int in [2, 5]"),
    ({"options": {"acop": {"clips": 6}}}, "'options.acop': acop: 'clips' must be an int in [2, 5]"),
    ({"options": {"acop": {"gap": 1.0}}}, "'options.acop': acop: 'gap' must be in [0, 1)"),
    ({"options": {"acop": {"span": "tiled"}}}, "'options.acop': acop: 'span' must be one of valid, all"),
    ({"options": {"byol": {"tau": 1.0}}}, "'options.byol': byol: 'tau' must be in [0, 1)"),
    ({"options": {"byol": {"tau": "high"}}}, "'options.byol': byol: 'tau' must be in [0, 1)"),
    ({"options": {"byol": {"tau": float("inf")}}}, "'options.byol.tau' must be a finite number"),
])
def test_ssl_ranges(options: dict[str, Any], message: str) -> None:
    (problem,) = _problems({"ssl": options})
    assert problem.startswith(f"ssl: {message}")


def test_each_method_takes_its_own_options() -> None:
    options = {"simclr": {"temperature": 0.5}, "barlow_twins": {"lambd": 0.1}, "acop": {"clips": 4, "gap": 0.0},
               "byol": {"tau": 0.5}}
    ssl = load_params({"ssl": {"method": "simclr", "projector_dim": 7, "options": options}}).ssl
    assert ssl.method_kwargs() == {"projector_dim": 7, "hidden_dim": 256, "augment": None, "temperature": 0.5}
    for method, own in options.items():
        assert SSLConfig(method=method, options=options).method_kwargs() == {
            "projector_dim": 128, "hidden_dim": 256, "augment": None, **own}
    # a method not listed takes its defaults; none takes no options at all
    assert SSLConfig(method="byol").method_kwargs() == {"projector_dim": 128, "hidden_dim": 256, "augment": None}
    assert SSLConfig(method="none", options=options).method_kwargs() == {}


def test_an_unknown_option_of_a_method_is_refused_not_dropped() -> None:
    assert _problems({"ssl": {"method": "simclr", "options": {"simclr": {"temprature": 0.5}}}}) == [
        "ssl: 'options.simclr': unknown options ['temprature']; simclr takes ['temperature']."]


def test_an_option_of_another_method_is_refused() -> None:
    problems = _problems({"ssl": {"method": "simclr", "options": {"simclr": {"tau": 0.5}, "byol": {"lambd": 0.1}}}})
    assert problems == ["ssl: 'options.simclr': unknown options ['tau']; simclr takes ['temperature'].",
                        "ssl: 'options.byol': unknown options ['lambd']; byol takes ['tau']."]


def test_the_old_flat_options_are_unknown_keys() -> None:
    (problem,) = _problems({"ssl": {"method": "simclr", "temperature": 0.5}})
    assert problem.startswith("ssl: unknown keys ['temperature']")


@pytest.mark.parametrize("shared", [{"projector_dim": 64}, {"hidden_dim": 64}, {"augment": None}])
def test_a_method_must_not_repeat_the_shared_options(shared: dict[str, Any]) -> None:
    (name,) = shared
    assert _problems({"ssl": {"options": {"acop": {"clips": 4, **shared}}}}) == [
        f"ssl: 'options.acop': options [{name!r}] are shared by every ssl_method: set them in 'ssl' itself "
        f"(e.g. ssl.{name}), not per ssl_method."]


def test_every_problem_of_the_method_options_is_listed() -> None:
    options = {"moco": {"k": 1}, "simclr": {"temperature": -1.0}, "byol": {"tau": 0.5, "x": 1}, "acop": 3,
               "barlow_twins": {"hidden_dim": 8}, "none": {"lr": 0.1}}
    problems = _problems({"ssl": {"method": "simclr", "options": options}})
    assert len(problems) == 6, problems
    assert problems[0].startswith("ssl: 'options.moco': no ssl_method is registered as 'moco'; registered: acop, ")
    assert problems[3] == "ssl: 'options.acop' must be a mapping of option names to values. Got 3."
    assert problems[5] == "ssl: 'options.none': unknown options ['lr']; none takes []."


# ------------------------------------------------------------------------------------------------ downstream
@pytest.mark.parametrize("name", ["a b", "latest", "LATEST", "v3", "V12", "", "a/b", "a.b"])
def test_task_names_must_be_alias_safe(name: str) -> None:
    (problem,) = _problems({"downstream": {"tasks": [{"name": name, "dataset": "fsdd"}]}})
    assert "task 'name' must be letters, digits, '_' or '-'" in problem
    assert problem.endswith(f"Got {name!r}.")


@pytest.mark.parametrize("name", ["vowels", "v", "v3a", "fsdd_speaker", "esc-10", "latest2", "3"])
def test_alias_safe_task_names_are_accepted(name: str) -> None:
    params = load_params({"downstream": {"tasks": [{"name": name, "dataset": "fsdd"}]}})
    assert params.downstream.task_configs()[0].name == name


def test_task_needs_a_dataset_and_known_keys() -> None:
    assert _problems({"downstream": {"tasks": [{"name": "digit"}]}}) == [
        "downstream: task 'digit' needs a 'dataset'. Got ''."]
    (problem,) = _problems({"downstream": {"tasks": [{**TASK, "column": "label"}]}})
    assert problem.startswith("downstream: tasks[0]: unknown keys ['column']")
    (problem,) = _problems({"downstream": {"tasks": ["digit"]}})
    assert problem.startswith("downstream: tasks[0]: must be a mapping")


def test_duplicate_task_names_are_rejected() -> None:
    tasks = [TASK, {"name": "digit", "dataset": "esc10"}, {"name": "who", "dataset": "fsdd", "label": "speaker"}]
    assert _problems({"downstream": {"tasks": tasks}}) == [
        "downstream: task names must be distinct. Got ['digit'] more than once."]


def test_bad_label_column_is_rejected() -> None:
    (problem,) = _problems({"downstream": {"tasks": [{**TASK, "label": "genre"}]}})
    assert problem == "downstream: tasks[0]: 'label' must be one of 'label', 'speaker'. Got 'genre'."


@pytest.mark.parametrize(("downstream", "ok"), [
    ({"ks": [1, 5], "select_metric": "knn5"}, True),
    ({"ks": [1, 5], "select_metric": "knn1"}, True),
    ({"ks": [1, 5], "select_metric": "knn20"}, False),
    ({"select_metric": "knn20"}, True),  # default ks [1, 20]
    ({"select_metric": "knn"}, False),
    ({"select_metric": "accuracy"}, False),
    ({"select_metric": "probe"}, False),
    ({"select_metric": "probe", "linear_probe": False}, False),
    ({"select_metric": "probe", "linear_probe": True}, True),
])
def test_select_metric_must_be_computed(downstream: dict[str, Any], ok: bool) -> None:
    if ok:
        assert load_params({"downstream": downstream}).downstream.select_metric == downstream["select_metric"]
    else:
        (problem,) = _problems({"downstream": downstream})
        assert problem.startswith("downstream: 'select_metric' must be one of knn")
        assert "(or probe with linear_probe: true)" in problem
        assert problem.endswith(f"Got {downstream['select_metric']!r}.")


@pytest.mark.parametrize("ks", [[0], [1, -3], [], [True], [1, 2.0]])
def test_ks_must_be_positive_ints(ks: list[Any]) -> None:
    problems = _problems({"downstream": {"ks": ks, "select_metric": "probe", "linear_probe": True}})
    assert problems == [f"downstream: 'ks' must be a non-empty list of ints >= 1. Got {ks!r}."]


def test_every_downstream_problem_is_listed() -> None:
    raw = {"ssl": {"method": "moco"},
           "downstream": {"tasks": [{"name": "latest", "dataset": "d"}, {"name": "a", "dataset": "d"},
                                    {"name": "a", "dataset": "e"}],
                          "ks": [1], "select_metric": "knn3", "val_fraction": 1.0}}
    problems = _problems(raw)
    assert len(problems) == 2, problems  # ssl, and the val_fraction range (checked before the cross-field rules)
    assert any(p.startswith("downstream: 'val_fraction' must be < 1.0") for p in problems)
    del raw["downstream"]["val_fraction"]
    problems = _problems(raw)
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert "Got 'latest'." in text and "Got ['a'] more than once." in text and "Got 'knn3'." in text


# ------------------------------------------------------------------------------------------------ spec, fingerprint
def _spec_params(**sections: dict[str, Any]) -> Params:
    return load_params(dict(sections))


@pytest.mark.parametrize("rule", ["fml", "fedmlac", "local"])
def test_self_supervised_run_needs_a_shared_model_rule(rule: str) -> None:
    params = _spec_params(ssl={"method": "simclr"}, federation={"local_algorithm": rule})
    with pytest.raises(ConfigError, match=rf"^ssl: 'method' 'simclr' needs a local algorithm .*: {rule!r} distils"):
        make_spec(params, 3, 10, (1, 16, 24), 1)
    # supervised, the same rule is fine
    supervised = make_spec(_spec_params(federation={"local_algorithm": rule}), 3, 10, (1, 16, 24), 1)
    assert len(supervised.assignment) == 3


@pytest.mark.parametrize("rule", ["fedavg", "fedprox", "fedu"])
def test_self_supervised_spec_with_a_shared_model_rule(rule: str) -> None:
    params = _spec_params(ssl={"method": "byol", "options": {"byol": {"tau": 0.5}}},
                          federation={"local_algorithm": rule})
    spec = make_spec(params, 3, 10, (1, 16, 24), 1)
    assert spec.ssl == params.ssl and spec.ssl.method_kwargs()["tau"] == 0.5
    assert spec.personal_models == () and spec.assignment == ()


def _fingerprint(with_params: bool = True, **sections: dict[str, Any]) -> str:
    params = _spec_params(**sections)
    spec = make_spec(params, 3, 10, (1, 16, 24), 1)
    return run_fingerprint(spec, "digest", params if with_params else None)


@pytest.mark.parametrize("with_params", [True, False])
def test_fingerprint_follows_the_ssl_settings_of_a_self_supervised_run(with_params: bool) -> None:
    base = _fingerprint(with_params, ssl={"method": "simclr"})
    assert base == _fingerprint(with_params, ssl={"method": "simclr"})
    for changed in ({"method": "simclr", "options": {"simclr": {"temperature": 0.5}}},
                    {"method": "simclr", "projector_dim": 64},
                    {"method": "simclr", "augment": [{"name": "gain"}]}, {"method": "barlow_twins"}, {}):
        assert _fingerprint(with_params, ssl=changed) != base, changed


def test_fingerprint_follows_downstream_only_for_a_self_supervised_run() -> None:
    tasks = {"tasks": [TASK]}
    assert _fingerprint(ssl={"method": "acop"}) != _fingerprint(ssl={"method": "acop"}, downstream=tasks)
    assert _fingerprint() == _fingerprint(downstream=tasks)


def test_fingerprint_of_a_supervised_run_ignores_the_ssl_settings() -> None:
    base = _fingerprint()
    for ignored in ({"options": {"simclr": {"temperature": 0.5}}},
                    {"options": {"byol": {"tau": 0.5}, "acop": {"clips": 4}}}, {"augment": [{"name": "gain"}]},
                    {"method": "none", "projector_dim": 3}):
        assert _fingerprint(ssl=ignored) == base, ignored
        assert _fingerprint(False, ssl=ignored) == _fingerprint(False)
    assert _fingerprint(federation={"lr": 0.01}) != base  # the fingerprint does see the arithmetic
