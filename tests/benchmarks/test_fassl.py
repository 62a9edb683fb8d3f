"""FASSL benchmark settings and table: override layering, the central baseline, one row per finished cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks.benchlib import read_matrix_params
from benchmarks.fassl.driver import CENTRAL, cell_params, collect, markdown_table, settings_of, table_rows
from fedcore.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "benchmarks/fassl/params.yaml"


def _settings() -> dict[str, object]:
    return settings_of(yaml.safe_load(PARAMS.read_text()))


def _raw() -> dict[str, object]:
    return read_matrix_params(PARAMS, "fassl")[0]


def test_cell_layers_method_aggregator_and_transmission_over_common() -> None:
    params = cell_params(_raw(), _settings(), "acop", "ldawa", "backbone")
    assert params.ssl.method == "acop" and params.federation.aggregator == "ldawa"
    assert params.federation.local_algorithm == "fedavg" and params.federation.send == "backbone"
    assert params.federation.lr == 0.01  # the method's override over the common one
    assert params.partition.scheme == "dirichlet" and params.partition.holdout_fraction == 0.0
    assert params.downstream.registered_model == "fassl-acop-ldawa-backbone"
    assert [t["name"] for t in params.downstream.tasks] == ["fsdd_digit", "fsdd_speaker", "esc10_category"]


def test_fedu_cells_are_byol_with_the_predictor_sent() -> None:
    settings = _settings()
    assert "fedu" not in settings["aggregator_names"] and "byol" in settings["method_names"]
    assert settings["fedu_methods"] == ["byol"]
    for method in settings["fedu_methods"]:
        params = cell_params(_raw(), settings, method, "fedu", "all")
        assert params.ssl.method == "byol" and params.federation.local_algorithm == "fedu"
        assert params.federation.aggregator == "fedavg" and params.federation.send == "all"
        assert params.fedu.predictor == "predictor" and params.fedu.mu_scale == "relative"
    stage = yaml.safe_load((PARAMS.parent / "dvc.yaml").read_text())["stages"]["fedu"]
    assert stage["foreach"] == "${fassl.fedu_methods}" and "--aggregator fedu --send all" in stage["do"]["cmd"]
    for method in ("simclr", "barlow_twins", "acop"):  # no predictor: refused at params check
        with pytest.raises(ConfigError, match="fedu needs ssl.method byol"):
            cell_params(_raw(), settings, method, "fedu", "all")


def test_central_is_one_client_holding_the_pool_with_the_same_budget() -> None:
    federated = cell_params(_raw(), _settings(), "simclr", "fedavg", "all")
    central = cell_params(_raw(), _settings(), "simclr", CENTRAL, "all")
    assert central.partition.num_clients == 1 and central.partition.scheme == "iid"
    for key in ("rounds", "local_epochs", "batch_size", "lr"):
        assert getattr(central.federation, key) == getattr(federated.federation, key)


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="'nope' must be one of"):
        cell_params(_raw(), _settings(), "nope", "fedavg", "all")
    bad = {"fassl": {"method_names": ["simclr", "ghost"], "methods": {"simclr": {}}}}
    with pytest.raises(ConfigError, match="'ghost'"):
        settings_of(bad)


def _cell(root: Path, method: str, aggregator: str, send: str, best: float, last: float, floor: float) -> None:
    folder = root / "cells" / method / aggregator / send
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"rounds": 4}))
    tasks = {"t": {"best_round": 2, "best_test": best, "last_round": 4, "last_test": last, "floor_test": floor}}
    (folder / "selection.json").write_text(json.dumps({"metric": "knn1", "tasks": tasks}))


def test_table_has_the_floor_and_one_row_per_cell(tmp_path: Path) -> None:
    _cell(tmp_path, "simclr", "fedavg", "all", 0.9, 0.8, 0.5)
    _cell(tmp_path, "acop", CENTRAL, "all", 0.7, 0.75, 0.5)
    tasks, rows = table_rows(collect(tmp_path))
    assert tasks == ["t"]
    assert [(r["method"], r["aggregator"]) for r in rows] == [("acop", CENTRAL), ("simclr", "fedavg")]
    text = markdown_table(tasks, rows, "knn1")
    assert "| random init (floor) | — | — | 0.500 | 0.500 |" in text
    assert "| simclr | fedavg | all | 0.900 / 0.800 (r2) | 0.900 / 0.800 |" in text
