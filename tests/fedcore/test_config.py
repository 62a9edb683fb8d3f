from __future__ import annotations

import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from fedcore.config import SECTIONS, FeaturesConfig, FederationConfig, Params, flatten, load_params, load_section
from fedcore.errors import ConfigError
from tasks.common import read_params

ROOT = Path(__file__).resolve().parents[2]


def test_committed_params_file_loads_and_equals_field_names() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = load_params(raw)
    assert isinstance(params, Params)
    # Every section of the dataclasses is present in params.yaml, key for key, so users see every knob.
    for name, cls in SECTIONS.items():
        assert set(raw[name]) == set(cls.__dataclass_fields__), name


def test_defaults_build_without_params() -> None:
    params = load_params({})
    assert params.partition.num_clients == 10
    assert flatten(params)["federation.rounds"] == params.federation.rounds


def test_unknown_key_is_named_with_the_allowed_keys() -> None:
    with pytest.raises(ConfigError, match=r"partition: unknown keys \['alpah'\]; allowed: .*'alpha'"):
        load_params({"partition": {"alpah": 0.5}})


def test_unknown_section() -> None:
    with pytest.raises(ConfigError, match=r"unknown sections \['federaton'\]"):
        load_params({"federaton": {}})


@pytest.mark.parametrize("alpha", [0, -1.0, 0.0])
def test_alpha_must_be_positive(alpha: float) -> None:
    with pytest.raises(ConfigError, match=rf"partition: 'alpha' must be > 0.0. Got {alpha!r}."):
        load_params({"partition": {"alpha": alpha}})


def test_every_problem_is_listed_in_one_error() -> None:
    raw = {
        "partition": {"alpha": -1, "num_clients": 0, "colour": "red"},
        "federation": {"rounds": "ten", "aggregator": "nope"},
        "features": {"win_length": 800, "n_fft": 400},
    }
    with pytest.raises(ConfigError) as info:
        load_params(raw)
    problems = info.value.problems
    assert len(problems) == 6, problems
    text = str(info.value)
    assert "6 problems" in text
    assert "'rounds' must be an int. Got 'ten'." in text
    assert "'aggregator' must be a registered aggregator, one of fairavg" in text
    assert "'win_length' must be <= n_fft (400). Got 800." in text
    assert "'num_clients' must be >= 1. Got 0." in text


def test_bool_is_not_an_int() -> None:
    with pytest.raises(ConfigError, match="'rounds' must be an int. Got True."):
        load_params({"federation": {"rounds": True}})


def test_int_is_accepted_for_float_and_literal_checked() -> None:
    cfg = load_section(FeaturesConfig, {"clip_seconds": 2, "crop": "start"}, "features")
    assert cfg.clip_seconds == 2
    with pytest.raises(ConfigError, match=r"'crop' must be one of 'center', 'start'. Got 'middle'."):
        load_section(FeaturesConfig, {"crop": "middle"}, "features")


def test_targeted_flip_needs_source_and_target() -> None:
    with pytest.raises(ConfigError, match="'source' and 'target' must be set"):
        load_params({"poison": {"attack": "targeted_flip", "client_fraction": 0.2}})


def test_section_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="federation: must be a mapping"):
        load_params({"federation": [1, 2]})


# ------------------------------------------------------------------------------------------ non-finite numbers
def _float_fields() -> list[tuple[str, str]]:
    """(section, field) of every field that accepts a float, in every section."""
    found = []
    for section, cls in SECTIONS.items():
        for name, hint in typing.get_type_hints(cls).items():
            if hint is float or float in typing.get_args(hint):
                found.append((section, name))
    return found


FLOAT_FIELDS = _float_fields()


def test_float_fields_are_found_in_many_sections() -> None:
    sections = {section for section, _ in FLOAT_FIELDS}
    assert {"federation", "partition", "features", "poison", "aggregation", "attack", "distill"} <= sections


@pytest.mark.parametrize(("section", "name"), FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_field_rejects_non_finite_values(section: str, name: str, value: float) -> None:
    with pytest.raises(ConfigError) as info:
        load_params({section: {name: value}})
    assert info.value.problems == [
        f"{section}: '{name}' must be a finite number. Got {value!r}. Fix: write a finite value (YAML reads .inf, "
        "-.inf and .nan as infinities and NaN)."
    ]


@pytest.mark.parametrize(("yaml_value", "shown"), [(".inf", "inf"), (".nan", "nan"), ("-.inf", "-inf"),
                                                   (".Inf", "inf"), (".NaN", "nan")])
def test_read_params_rejects_yaml_infinities_and_nan(tmp_path: Path, yaml_value: str, shown: str) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(f"federation:\n  lr: {yaml_value}\n  rounds: 2\n")
    with pytest.raises(ConfigError, match=rf"federation: 'lr' must be a finite number. Got {shown}\."):
        read_params(params)


def test_non_finite_values_inside_lists_and_mappings_are_named_by_their_place(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        "earlyexit:\n"
        "  tiers: [{share: .nan, depth: 2}, {share: 1.0, depth: 4}]\n"
        "  backbone_options: {scales: [1.0, -.inf]}\n"
        "ssl:\n"
        "  augment: [{name: gain, p: .inf}]\n"
    )
    with pytest.raises(ConfigError) as info:
        read_params(params)
    text = str(info.value)
    assert "earlyexit: 'tiers[0].share' must be a finite number. Got nan." in text
    assert "earlyexit: 'backbone_options.scales[1]' must be a finite number. Got -inf." in text
    assert "ssl: 'augment[0].p' must be a finite number. Got inf." in text


def test_string_fields_spelled_nan_or_inf_stay_valid(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("attack:\n  name: nan\n  options: {nan: {nan_value: nan}}\n")
    assert read_params(params).attack.options_of("nan") == {"nan_value": "nan"}
    params.write_text("attack:\n  name: nan\n  options: {nan: {nan_value: inf}}\n")
    assert read_params(params).attack.options_of("nan") == {"nan_value": "inf"}
    params.write_text("mlflow:\n  experiment: .nan\n")  # a string field: YAML's float NaN is the wrong type
    with pytest.raises(ConfigError, match=r"mlflow: 'experiment' must be a str. Got nan."):
        read_params(params)


def test_each_rule_declares_its_own_options_and_unknown_ones_are_refused() -> None:
    from fedcore.config import load_params

    rules = {"fedadam": {"server_lr": 0.3}, "trimmed_mean": {"trim_beta": 0.1}}
    params = load_params({"aggregation": {"rules": rules},
                          "attack": {"name": "scaling", "options": {"scaling": {"scaling_boost": 3.0}}}})
    assert params.aggregation.options_of("fedadam") == {"flag_ratio": 0.5, "server_lr": 0.3}
    assert params.aggregation.options_of("median") == {"flag_ratio": 0.5}  # not listed: its defaults
    assert params.attack.options_of("scaling") == {"scaling_boost": 3.0}
    with pytest.raises(ConfigError) as info:
        load_params({"aggregation": {"rules": {"fedadam": {"server_lr": 0.3, "trim_beta": 0.1},
                                               "fedsgd": {"lr": 1.0}, "trimmed_mean": {"trim_beta": 0.7}}},
                     "attack": {"options": {"gaussian": {"sigma": 2.0}}}})
    text = str(info.value)
    assert "aggregation: 'rules.fedadam': unknown options ['trim_beta']; fedadam takes" in text  # never dropped
    assert "aggregation: 'rules.fedsgd': no aggregator is registered as 'fedsgd'" in text
    assert "aggregation: 'rules.trimmed_mean': TrimmedMean: 'trim_beta' must be" in text  # the rule's own check
    assert "attack: 'options.gaussian': unknown options ['sigma']; gaussian takes ['gaussian_sigma']" in text


def test_execution_knobs_are_their_own_section() -> None:
    from fedcore.config import load_params

    params = load_params({"execution": {"runner": "processes", "max_workers": 2, "log_model_every": 5}})
    assert (params.execution.runner, params.execution.max_workers, params.execution.log_model_every) == (
        "processes", 2, 5)
    with pytest.raises(ConfigError, match="federation: unknown keys \\['runner'\\]"):
        load_params({"federation": {"runner": "threads"}})


def test_early_exit_runs_to_a_validation_plateau_by_default_and_reads_only_validation_metrics() -> None:
    cfg = load_params({}).earlyexit
    assert (cfg.stop, cfg.plateau_metric, cfg.plateau_min_gain, cfg.plateau_patience, cfg.rounds) == (
        "plateau", None, 0.005, 5, None)
    assert load_params({"earlyexit": {"plateau_metric": "val_exit4_accuracy"}}).earlyexit.plateau_metric
    with pytest.raises(ConfigError) as info:
        load_params({"earlyexit": {"plateau_metric": "exit6_accuracy"}})  # the test split's: refused
    assert "earlyexit: 'plateau_metric' must be an exit's validation accuracy, one of ['val_exit2_accuracy'" in str(
        info.value)
    with pytest.raises(ConfigError, match="'plateau_patience' must be >= 1"):
        load_params({"earlyexit": {"plateau_patience": 0}})


_PROBE = ("import sys; from tasks.common import read_params; params = read_params({path!r}, {sections!r}); "
          "print('torch' in sys.modules, params.download.dataset, params.features.clip_seconds, "
          "params.partition.scheme)")


@pytest.mark.parametrize("sections", [["download"], ["features"], ["partition"], ["features", "poison"]])
def test_the_data_stages_check_their_sections_without_importing_torch(tmp_path: Path, sections: list[str]) -> None:
    # What the download, features, partition and poison stages read (flows/<stage>.py): torch costs ~2 s a stage.
    params = tmp_path / "params.yaml"
    params.write_text("download: {dataset: esc50}\nfeatures: {clip_seconds: null}\npartition: {scheme: iid}\n"
                      "federation: {local_algorithm: fml}\n")
    probe = subprocess.run([sys.executable, "-c", _PROBE.format(path=str(params), sections=sections)],
                           capture_output=True, text=True, check=True, cwd=ROOT)
    torch_loaded, dataset, clip_seconds, scheme = probe.stdout.split()
    assert torch_loaded == "False"
    # features brings download with it: ESC-50's own clip length (null in the file), not FSDD's
    assert dataset == ("esc50" if {"download", "features"} & set(sections) else "fsdd")
    assert clip_seconds == ("5.0" if "features" in sections else "1.0")  # unread: the section's default
    assert scheme == ("iid" if "partition" in sections else "dirichlet")


def test_a_section_left_out_is_not_checked_and_keeps_its_defaults(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("partition: {scheme: iid}\nfederation: {rounds: -1}\n")
    with pytest.raises(ConfigError, match="rounds"):
        read_params(params)  # every section: the check stage's view
    assert read_params(params, ["partition"]).federation.rounds == FederationConfig().rounds


def test_a_family_is_imported_only_when_a_section_names_it() -> None:
    code = ("import sys; from fedcore.plugins import FAMILIES; "
            "before = 'fedcore.aggregation' in sys.modules; names = FAMILIES['aggregator'].names(); "
            "print(before, 'fedcore.aggregation' in sys.modules, 'fedavg' in names, 'torch' in sys.modules)")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert probe.stdout.split() == ["False", "True", "True", "True"]  # the aggregators need torch: loaded now
