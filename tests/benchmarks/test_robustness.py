"""Robustness benchmark helpers: scenario names, per-cell params, the results table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks.benchlib import read_matrix_params
from benchmarks.robustness.driver import cell_params, collect, markdown_table, parse_scenario, plot_drops
from fedcore.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "benchmarks/robustness/params.yaml"


def test_scenarios_parse_and_bad_ones_are_clear_errors() -> None:
    assert parse_scenario("clean") == ("none", 0.0)
    assert parse_scenario("sign_flip-0.2") == ("sign_flip", 0.2)
    for bad in ("sign_flip", "alie-2", "-0.2", "x-y"):
        with pytest.raises(ConfigError, match="scenario"):
            parse_scenario(bad)


def test_cell_params_apply_overrides_then_the_cell() -> None:
    raw = read_matrix_params(PARAMS, "robustness")[0]
    bench = yaml.safe_load(PARAMS.read_text())["robustness"]
    params = cell_params(raw, bench["overrides"], "krum", "alie-0.4")
    assert params.federation.aggregator == "krum" and params.attack.name == "alie"
    assert params.attack.client_fraction == 0.4
    assert params.federation.rounds == bench["overrides"]["federation.rounds"]
    assert params.model.width == bench["overrides"]["model.width"]
    assert params.partition == cell_params(raw, {}, "fedavg", "clean").partition  # data untouched
    with pytest.raises(ConfigError, match="aggregator"):
        cell_params(raw, {}, "nope", "clean")
    with pytest.raises(ConfigError, match="attack"):
        cell_params(raw, {}, "fedavg", "nope-0.2")
    # Every configured cell is a valid run.
    for aggregator in bench["aggregators"]:
        for scenario in bench["scenarios"]:
            cell_params(raw, bench["overrides"], aggregator, scenario)


def test_table_reports_drop_against_the_same_rules_clean_run(tmp_path: Path) -> None:
    cells = {("fedavg", "clean"): {"global_accuracy": 0.9, "detect_precision": None, "detect_recall": None},
             ("fedavg", "sign_flip-0.2"): {"global_accuracy": 0.5, "detect_precision": None, "detect_recall": 0.0},
             ("median", "clean"): {"global_accuracy": 0.8},
             ("median", "sign_flip-0.2"): {"global_accuracy": 0.78, "detect_precision": 0.5, "detect_recall": 1.0}}
    for (aggregator, scenario), metrics in cells.items():
        folder = tmp_path / aggregator / scenario
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(metrics))
    table = collect(tmp_path)
    text = markdown_table(table, ["median", "fedavg"], ["clean", "sign_flip-0.2", "alie-0.2"])
    lines = text.splitlines()
    assert lines[0] == "| aggregator | clean | sign_flip-0.2 |"
    assert lines[2].startswith("| median | 0.800 | 0.780 (-0.020)<br>P 0.50 R 1.00 |")
    assert lines[3].startswith("| fedavg | 0.900 | 0.500 (-0.400)<br>P — R 0.00 |")
    plot_drops(table, ["median", "fedavg"], [], tmp_path / "drop.png")
    assert (tmp_path / "drop.png").stat().st_size > 1000
