"""Personalisation benchmark helpers: settings, per-stage params, scenario names, the results table and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks.benchlib import read_matrix_params
from benchmarks.personalisation.driver import (
    cell_params,
    collect,
    data_params,
    markdown_report,
    markdown_table,
    parse_scenario,
    parse_sets,
    plot_comparison,
    settings_of,
)
from fedcore.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "benchmarks/personalisation/params.yaml"


@pytest.fixture(scope="module")
def raw() -> dict[str, object]:
    return read_matrix_params(PARAMS, "personalisation")[0]


@pytest.fixture(scope="module")
def bench() -> dict[str, object]:
    return yaml.safe_load(PARAMS.read_text())


def test_scenarios_parse_and_bad_ones_are_clear_errors() -> None:
    assert parse_scenario("clean") == ("none", 0.0)
    assert parse_scenario("label_flip-0.2") == ("label_flip", 0.2)
    assert parse_scenario("snr_noise-0.4") == ("snr_noise", 0.4)
    for bad in ("label_flip", "label_flip-2", "-0.2", "x-y"):
        with pytest.raises(ConfigError, match="scenario"):
            parse_scenario(bad)


def test_settings_name_lists_must_match_their_mappings(bench: dict[str, object]) -> None:
    settings = settings_of(bench)
    # the five methods, plus the FedMLAC-with-FedAvg ablation
    assert settings["method_names"] == ["local", "fedavg", "fedprox", "fml", "fedmlac", "fedmlac_fedavg"]
    assert settings["dataset_names"] == ["fsdd", "esc10"]
    broken = {"personalisation": {**settings, "method_names": ["fedavg", "nope"], "scenarios": ["clean", "x-y"]}}
    with pytest.raises(ConfigError, match=r"'method_names'.*\['nope'\] missing") as error:
        settings_of(broken)
    assert "scenario" in str(error.value)
    with pytest.raises(ConfigError, match="personalisation"):
        settings_of({"robustness": {}})


def test_cell_params_layer_common_dataset_method_then_scenario(raw: dict[str, object],
                                                              bench: dict[str, object]) -> None:
    settings = settings_of(bench)
    params = cell_params(raw, settings, "esc10", "fedmlac", "snr_noise-0.2")
    assert params.download.dataset == "esc50" and params.download.esc10_only and params.download.test_fold == 5
    assert params.features.clip_seconds == 5.0
    assert (params.partition.scheme, params.partition.alpha, params.partition.num_clients) == ("dirichlet", 0.1, 10)
    assert params.federation.local_algorithm == "fedmlac" and params.federation.aggregator is None
    assert (params.model.width, params.model.depth) == (4, 3)  # the method's override beats common's
    assert [m["name"] for m in params.personal.models] == ["cnn", "cnn", "resnet"]
    assert (params.poison.attack, params.poison.client_fraction, params.poison.snr_db) == ("snr_noise", 0.2, 10.0)
    assert params.mlflow.experiment == "fedaudio-personalisation"

    fedavg = cell_params(raw, settings, "fsdd", "fedavg", "clean")
    assert fedavg.download.dataset == "fsdd" and fedavg.features.clip_seconds == raw["features"]["clip_seconds"]
    assert (fedavg.model.width, fedavg.model.depth, fedavg.personal.models) == (8, 4, [])
    assert (fedavg.poison.attack, fedavg.poison.client_fraction) == ("none", 0.0)
    # The data stage sees the same data settings as its cells.
    data = data_params(raw, settings, "esc10")
    assert (data.download, data.features, data.partition) == (params.download, params.features, params.partition)

    quick = cell_params(raw, settings, "fsdd", "local", "label_flip-0.4",
                        parse_sets(["federation.rounds=1", "model.width=2"]))
    assert quick.federation.rounds == 1 and quick.model.width == 2 and quick.poison.client_fraction == 0.4
    # Every configured cell is a valid run.
    for dataset in settings["dataset_names"]:
        for method in settings["method_names"]:
            for scenario in settings["scenarios"]:
                cell_params(raw, settings, dataset, method, scenario)


def test_unknown_names_and_bad_overrides_are_clear_errors(raw: dict[str, object],
                                                          bench: dict[str, object]) -> None:
    settings = settings_of(bench)
    with pytest.raises(ConfigError, match=r"method must be one of \['fedavg', 'fedmlac'.*Got 'nope'"):
        cell_params(raw, settings, "fsdd", "nope", "clean")
    with pytest.raises(ConfigError, match="dataset must be one of"):
        data_params(raw, settings, "urbansound")
    with pytest.raises(ConfigError, match="attack"):
        cell_params(raw, settings, "fsdd", "fedavg", "nope-0.2")
    with pytest.raises(ConfigError, match="section.key"):
        cell_params(raw, {**settings, "common": {"rounds": 3}}, "fsdd", "fedavg", "clean")
    with pytest.raises(ConfigError, match="--set"):
        parse_sets(["federation.rounds"])
    assert parse_sets(["federation.aggregator=null", "personal.models=[{name: cnn}]"]) == {
        "federation.aggregator": None, "personal.models": [{"name": "cnn"}]}


def _write_cells(root: Path, cells: dict[tuple[str, str, str], dict[str, float]]) -> None:
    for (dataset, method, scenario), metrics in cells.items():
        folder = root / dataset / method / scenario
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(metrics))


def _m(mean: float, worst: float, glob: float) -> dict[str, float]:
    return {"personalised_accuracy_mean": mean, "personalised_accuracy_worst10": worst, "global_accuracy": glob,
            "best_global_accuracy": glob, "seconds_total": 1.0}


def test_table_reports_three_accuracies_drop_and_missing_cells(tmp_path: Path) -> None:
    _write_cells(tmp_path, {
        ("esc10", "fedavg", "clean"): _m(0.7, 0.4, 0.65),
        ("esc10", "fedavg", "label_flip-0.2"): _m(0.6, 0.3, 0.55),
        ("esc10", "fedmlac", "clean"): _m(0.812, 0.54, 0.7),
        ("esc10", "fedmlac", "label_flip-0.2"): _m(0.8, 0.5, 0.69),
        ("esc10", "local", "label_flip-0.2"): _m(0.5, 0.2, 0.3),  # no clean run: no drop
        ("fsdd", "fedavg", "clean"): _m(0.9, 0.8, 0.95),
    })
    (tmp_path / "esc10" / "data" / "features").mkdir(parents=True)  # the data folder is not a method
    table = collect(tmp_path)
    assert sorted(table) == ["esc10", "fsdd"] and sorted(table["esc10"]) == ["fedavg", "fedmlac", "local"]

    methods, scenarios = ["local", "fedavg", "fedmlac"], ["clean", "label_flip-0.2", "snr_noise-0.2"]
    lines = markdown_table(table["esc10"], methods, scenarios).splitlines()
    assert lines[0] == "| method | clean | label_flip-0.2 | snr_noise-0.2 |"
    assert lines[2] == "| local | not run | 0.500 / 0.200 / 0.300 | not run |"
    assert lines[3] == "| fedavg | 0.700 / 0.400 / 0.650 | 0.600 / 0.300 / 0.550 (-0.100) | not run |"
    assert lines[4] == "| fedmlac | 0.812 / 0.540 / 0.700 | 0.800 / 0.500 / 0.690 (-0.012) | not run |"

    report = markdown_report(table, ["fsdd", "esc10"], methods, scenarios)
    assert report.index("### fsdd") < report.index("### esc10")
    assert report.count("worst 10%") == 2  # a legend above each table
    fsdd = report[report.index("### fsdd"):report.index("### esc10")]
    assert "| fedavg | 0.900 / 0.800 / 0.950 | not run | not run |" in fsdd
    assert "| fedmlac | not run | not run | not run |" in fsdd

    plot_comparison(table, ["fsdd", "esc10"], methods, scenarios, tmp_path / "comparison.png")
    assert (tmp_path / "comparison.png").stat().st_size > 5000

