"""Personalisation matrix: settings, per-stage params, seeds, the expansion into runs, the table and the claims."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.benchlib import read_matrix_params
from benchmarks.personalisation.driver import (
    CELLS_YAML,
    Run,
    build_table,
    cell_params,
    cell_seeds,
    cells_yaml_text,
    claims_markdown,
    collect,
    data_params,
    evaluate_claim,
    expand,
    markdown_tables,
    measure,
    parse_scenario,
    parse_sets,
    partitions,
    planned_seconds,
    plot_comparison,
    settings_of,
)
from fedcore.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "benchmarks/personalisation"
PARAMS = FOLDER / "params.yaml"


@pytest.fixture(scope="module")
def raw() -> dict[str, object]:
    return read_matrix_params(PARAMS, "personalisation")[0]


@pytest.fixture(scope="module")
def settings() -> dict[str, Any]:
    return settings_of(yaml.safe_load(PARAMS.read_text()))


# --------------------------------------------------------------------------------------------------- settings
def test_scenarios_parse_and_bad_ones_are_clear_errors() -> None:
    assert parse_scenario("clean") == ("none", 0.0)
    assert parse_scenario("label_flip-0.2") == ("label_flip", 0.2)
    assert parse_scenario("snr_noise-0.4") == ("snr_noise", 0.4)
    for bad in ("label_flip", "label_flip-2", "-0.2", "x-y"):
        with pytest.raises(ConfigError, match="scenario"):
            parse_scenario(bad)


def test_settings_name_lists_must_match_their_mappings(settings: dict[str, Any]) -> None:
    assert settings["method_names"] == ["local", "fedavg", "fml", "fedmlac", "fedmlac_homog"]
    assert settings["dataset_names"] == ["fsdd", "esc10"]
    assert settings["scenarios"] == ["clean", "label_flip-0.2", "label_noise-0.2", "snr_noise-0.2"]
    broken = {"personalisation": {**settings, "method_names": ["fedavg", "nope"], "scenarios": ["clean", "x-y"]}}
    with pytest.raises(ConfigError, match=r"'method_names'.*\['nope'\] missing") as error:
        settings_of(broken)
    assert "scenario" in str(error.value)
    with pytest.raises(ConfigError, match="personalisation"):
        settings_of({"robustness": {}})


def test_claims_must_name_the_matrix_and_be_well_formed(settings: dict[str, Any]) -> None:
    good = settings["claims"][1]
    bad = [{**good, "id": "a", "against": ["fedprox"]},                      # not a method of the matrix
           {**good, "id": "b", "metric": "accuracy"},                          # no such measure
           {**good, "id": "c", "scenarios": ["clean"]},                        # a change needs a poisoned scenario
           {**good, "id": "d", "seeds": 1},                                    # no spread with one seed
           {**good, "id": "e", "favourable": "up"},
           {**good, "id": "f", "against": ["fedmlac"]},                        # itself
           {k: v for k, v in good.items() if k != "metric"}]
    with pytest.raises(ConfigError) as error:
        settings_of({"personalisation": {**settings, "claims": bad}})
    text = str(error.value)
    for expected in ("claims[0]: 'against'", "claims[1]: 'metric'", "claims[2]: 'benign_change'",
                     "claims[3]: 'seeds'", "claims[4]: 'favourable'", "claims[5]: 'against' must not",
                     "claims[6]: missing keys ['metric']"):
        assert expected in text, expected
    with pytest.raises(ConfigError, match="claim ids must be unique"):
        settings_of({"personalisation": {**settings, "claims": [good, good]}})


def test_cell_params_layer_common_dataset_method_scenario_then_seed(raw: dict[str, object],
                                                                    settings: dict[str, Any]) -> None:
    params = cell_params(raw, settings, "esc10", "fedmlac", "snr_noise-0.2", 3)
    assert params.download.dataset == "esc50" and params.download.esc10_only and params.download.test_fold == 5
    assert params.features.clip_seconds == 5.0
    assert (params.partition.scheme, params.partition.alpha, params.partition.num_clients) == ("dirichlet", 0.1, 10)
    assert params.federation.local_algorithm == "fedmlac" and params.federation.aggregator is None
    assert (params.model.width, params.model.depth) == (4, 3)  # the method's override beats common's
    assert [m["name"] for m in params.personal.models] == ["cnn", "cnn", "resnet"]
    assert (params.poison.attack, params.poison.client_fraction, params.poison.snr_db) == ("snr_noise", 0.2, 10.0)
    # seed 3 sets the partition, poison and initialisation seeds
    assert (params.partition.seed, params.poison.seed, params.federation.seed, params.personal.seed) == (3, 3, 3, 3)
    assert params.mlflow.experiment == "fedaudio-personalisation"

    fedavg = cell_params(raw, settings, "fsdd", "fedavg", "clean")
    assert fedavg.download.dataset == "fsdd" and fedavg.features.clip_seconds == raw["features"]["clip_seconds"]
    assert (fedavg.model.width, fedavg.model.depth, fedavg.personal.models) == (8, 4, [])
    assert (fedavg.poison.attack, fedavg.poison.client_fraction) == ("none", 0.0)
    assert (fedavg.partition.seed, fedavg.federation.seed) == (0, 0)  # seed 0: the single-seed setting
    # The data and partition stages see the same data settings as their runs.
    data = data_params(raw, settings, "esc10", 3)
    assert (data.download, data.features, data.partition) == (params.download, params.features, params.partition)

    quick = cell_params(raw, settings, "fsdd", "local", "label_flip-0.2", 1,
                        parse_sets(["federation.rounds=1", "model.width=2"]))
    assert quick.federation.rounds == 1 and quick.model.width == 2 and quick.poison.client_fraction == 0.2
    # Every run of the matrix is a valid run.
    for run in expand(settings):
        cell_params(raw, settings, run.dataset, run.method, run.scenario, run.seed)


def test_the_homogeneous_ablation_is_fml_with_lpa(raw: dict[str, object], settings: dict[str, Any]) -> None:
    """fedmlac_homog has FML's shared and personal models, so against fml only the server rule differs."""
    from fedcore.algorithms import LOCAL_ALGORITHMS

    for dataset in settings["dataset_names"]:
        homog = cell_params(raw, settings, dataset, "fedmlac_homog", "label_flip-0.2", 2)
        fml = cell_params(raw, settings, dataset, "fml", "label_flip-0.2", 2)
        assert homog.model == fml.model
        assert homog.personal.model_configs(homog.model) == fml.personal.model_configs(fml.model) == [fml.model]
        assert (homog.mutual, homog.personal, homog.poison, homog.partition) == \
            (fml.mutual, fml.personal, fml.poison, fml.partition)
        assert homog.federation.local_algorithm == "fedmlac" and fml.federation.local_algorithm == "fml"
        assert homog.federation.aggregator is fml.federation.aggregator is None
        assert homog.federation == fml.federation.__class__(**{**vars(fml.federation),
                                                               "local_algorithm": "fedmlac"})
    assert LOCAL_ALGORITHMS.build("fedmlac").default_aggregator == "lpa"
    assert LOCAL_ALGORITHMS.build("fml").default_aggregator == "fedavg"
    # the heterogeneous FedMLAC has a smaller shared Plug-in and mixed personal models
    fedmlac = cell_params(raw, settings, "fsdd", "fedmlac", "clean")
    assert (fedmlac.model.width, fedmlac.model.depth) == (4, 3) and len(fedmlac.personal.models) == 3


def test_unknown_names_and_bad_overrides_are_clear_errors(raw: dict[str, object], settings: dict[str, Any]) -> None:
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


# --------------------------------------------------------------------------------------------------- expansion
def test_the_matrix_expands_to_its_cells_times_seeds(settings: dict[str, Any]) -> None:
    seeds = cell_seeds(settings)
    assert len(seeds) == 2 * 5 * 4  # datasets × methods × scenarios
    # FML vs FedAvg (clean): 3 seeds; FSDD label flipping: 5 seeds for the arms and their clean runs
    fsdd5 = {("fsdd", m, s) for m in ("fedavg", "fml", "fedmlac", "fedmlac_homog")
             for s in ("clean", "label_flip-0.2")}
    fsdd3 = {("fsdd", m, "label_noise-0.2") for m in ("fedavg", "fml", "fedmlac", "fedmlac_homog")}
    esc3 = {("esc10", m, s) for m in ("fedavg", "fml", "fedmlac", "fedmlac_homog")
            for s in ("clean", "label_flip-0.2", "label_noise-0.2")}
    for cell, n in seeds.items():
        assert n == (5 if cell in fsdd5 else 3 if cell in fsdd3 | esc3 else 1), cell
    runs = expand(settings)
    assert len(runs) == 5 * len(fsdd5) + 3 * len(fsdd3 | esc3) + (40 - 24) == 104
    assert len(set(runs)) == len(runs) and runs[0] == Run("fsdd", "local", "clean", 0)
    assert [r.seed for r in runs if r[:3] == ("fsdd", "fml", "label_flip-0.2")] == [0, 1, 2, 3, 4]
    assert [r.seed for r in runs if r[:3] == ("fsdd", "local", "label_flip-0.2")] == [0]
    assert partitions(runs) == [("fsdd", k) for k in range(5)] + [("esc10", k) for k in range(3)]
    assert Run("fsdd", "fml", "label_flip-0.2", 3).name == "fsdd-fml-label_flip-0.2-s3"
    assert Run("fsdd", "fml", "clean", 3).folder(Path("r")) == Path("r/fsdd/fml/clean/s3")
    # without claims, every cell runs `seeds` seeds
    assert len(expand({**settings, "claims": [], "seeds": 2})) == 80


def test_cells_yaml_is_up_to_date_and_dvc_runs_exactly_its_runs(settings: dict[str, Any]) -> None:
    """dvc.yaml's stages come from cells.yaml (DVC cannot compute them): it must match the params."""
    assert (FOLDER / CELLS_YAML).read_text() == cells_yaml_text(settings), \
        "cells.yaml is out of date: run `python -m benchmarks.personalisation expand` in benchmarks/personalisation"
    from dvc.repo import Repo

    with Repo(str(FOLDER)) as repo:
        names = {stage.name for stage in repo.index.stages}
    runs = expand(settings)
    assert {n for n in names if n.startswith("cell@")} == {f"cell@{r.name}" for r in runs}
    assert {n for n in names if n.startswith("partition@")} == {f"partition@{d}-s{k}" for d, k in partitions(runs)}


def test_the_plan_counts_runs_and_hours(settings: dict[str, Any]) -> None:
    budget = {"anchor_seconds": 100, "overhead_seconds": 10, "data_seconds": 50, "partition_seconds": 5,
              "relative": {"a": {"x": 1.0, "y": 0.5}}}
    small = {"dataset_names": ["a"], "method_names": ["x", "y"], "scenarios": ["clean", "label_flip-0.2"],
             "seeds": 1, "budget": budget,
             "claims": [{"id": "c", "claim": "", "datasets": ["a"], "scenarios": ["clean"], "metric": "personalised",
                         "method": "x", "against": ["y"], "favourable": "positive", "seeds": 3}]}
    plan = planned_seconds(small)
    # x clean ×3, y clean ×3, x flip, y flip: 3·110 + 3·60 + 110 + 60; one dataset; 3 partitions
    assert plan["runs"] == 8 and plan["claim_cells"] == 2
    assert plan["seconds"] == pytest.approx(3 * 110 + 3 * 60 + 110 + 60 + 50 + 3 * 5)
    assert 2.0 <= planned_seconds(settings)["hours"] <= 3.0  # the params' header states the plan


# --------------------------------------------------------------------------------------------------- table
def _clients(accuracy: dict[int, float], attacked: list[int]) -> dict[str, Any]:
    benign = [a for c, a in accuracy.items() if c not in attacked]
    poisoned = [a for c, a in accuracy.items() if c in attacked]
    return {"accuracy": {str(c): a for c, a in accuracy.items()}, "attacked": attacked,
            "benign_accuracy_mean": sum(benign) / len(benign),
            "poisoned_accuracy_mean": sum(poisoned) / len(poisoned) if poisoned else None}


def _write(root: Path, run: Run, accuracy: dict[int, float], attacked: list[int], glob: float = 0.5) -> None:
    folder = run.folder(root)
    folder.mkdir(parents=True)
    mean = sum(accuracy.values()) / len(accuracy)
    (folder / "metrics.json").write_text(json.dumps({"personalised_accuracy_mean": mean, "global_accuracy": glob,
                                                     "personalised_accuracy_worst10": min(accuracy.values())}))
    (folder / "clients.json").write_text(json.dumps(_clients(accuracy, attacked)))


def test_benign_measures_on_hand_made_clients(tmp_path: Path) -> None:
    clean, flip = Run("fsdd", "fml", "clean", 0), Run("fsdd", "fml", "label_flip-0.2", 0)
    _write(tmp_path, clean, {0: 0.9, 1: 0.8, 2: 0.7, 3: 0.6}, [])
    _write(tmp_path, flip, {0: 0.85, 1: 0.8, 2: 0.1, 3: 0.0}, [2, 3], glob=0.4)
    results = collect(tmp_path, [clean, flip])
    assert measure(results, flip, "personalised") == pytest.approx(0.4375)       # every client
    assert measure(results, flip, "benign") == pytest.approx(0.825)              # clients 0 and 1
    assert measure(results, flip, "poisoned") == pytest.approx(0.05)
    assert measure(results, flip, "benign_change") == pytest.approx(-0.025)      # vs 0.85, not the clean 0.75
    assert measure(results, flip, "global") == pytest.approx(0.4)
    assert measure(results, clean, "benign_change") is None and measure(results, clean, "poisoned") is None
    assert measure(results, Run("fsdd", "fml", "clean", 1), "personalised") is None


def test_a_claim_gives_the_paired_t_interval_and_verdict(tmp_path: Path) -> None:
    """Three seeds: a − b = 0.10, 0.12, 0.08 → mean 0.10, sd 0.02, t_{0.975,2} = 4.3027: 0.10 ± 0.0497."""
    claim = {"id": "c", "claim": "fml beats fedavg", "datasets": ["fsdd"], "scenarios": ["clean"],
             "metric": "personalised", "method": "fml", "against": ["fedavg"], "favourable": "positive", "seeds": 3}
    for seed, (a, b) in enumerate([(0.80, 0.70), (0.82, 0.70), (0.78, 0.70)]):
        _write(tmp_path, Run("fsdd", "fml", "clean", seed), {0: a, 1: a}, [])
        _write(tmp_path, Run("fsdd", "fedavg", "clean", seed), {0: b, 1: b}, [])
    runs = [Run("fsdd", m, "clean", k) for m in ("fml", "fedavg") for k in range(3)]
    result = evaluate_claim(claim, collect(tmp_path, runs))
    row = result["rows"][0]
    half = 4.302652729911275 * 0.02 / 3 ** 0.5
    assert row["mean_diff"] == pytest.approx(0.10)
    assert (row["low"], row["high"]) == (pytest.approx(0.10 - half), pytest.approx(0.10 + half))
    assert row["verdict"] == result["verdict"] == "holds"
    assert evaluate_claim({**claim, "favourable": "negative"}, collect(tmp_path, runs))["verdict"] == "does not hold"
    # a difference whose interval spans 0 is unresolved; a missing seed leaves the claim not run
    _write(tmp_path, Run("fsdd", "fml", "clean", 3), {0: 0.5, 1: 0.5}, [])
    _write(tmp_path, Run("fsdd", "fedavg", "clean", 3), {0: 0.9, 1: 0.9}, [])
    four = evaluate_claim({**claim, "seeds": 4}, collect(tmp_path, runs + [Run("fsdd", "fml", "clean", 3),
                                                                           Run("fsdd", "fedavg", "clean", 3)]))
    assert four["rows"][0]["low"] < 0 < four["rows"][0]["high"] and four["verdict"] == "unresolved"
    five = evaluate_claim({**claim, "seeds": 5}, collect(tmp_path, runs))
    assert five["verdict"] == "not run" and five["rows"][0]["done"] == 3
    text = claims_markdown([result, five])
    assert "| fsdd | clean | fml − fedavg | +0.100 | [+0.050, +0.150] | holds |" in text
    assert "not run (3/5 seeds)" in text


def test_a_benign_change_claim_pairs_each_seed_with_its_own_clean_run(tmp_path: Path) -> None:
    claim = {"id": "l", "claim": "loses least", "datasets": ["fsdd"], "scenarios": ["label_flip-0.2"],
             "metric": "benign_change", "method": "fedmlac", "against": ["fml"], "favourable": "positive",
             "seeds": 2}
    runs = []
    # fedmlac's benign clients lose 0.00 and 0.02; fml's lose 0.10 and 0.14 (client 3 poisoned, seed-dependent)
    for seed, attacked in enumerate([[3], [0]]):
        for method, losses in (("fedmlac", (0.0, 0.02)), ("fml", (0.10, 0.14))):
            clean = {c: 0.8 + 0.01 * c + 0.05 * seed for c in range(4)}
            flip = {c: (0.0 if c in attacked else a - losses[seed]) for c, a in clean.items()}
            _write(tmp_path, Run("fsdd", method, "clean", seed), clean, [])
            _write(tmp_path, Run("fsdd", method, "label_flip-0.2", seed), flip, attacked)
            runs += [Run("fsdd", method, "clean", seed), Run("fsdd", method, "label_flip-0.2", seed)]
    row = evaluate_claim(claim, collect(tmp_path, runs))["rows"][0]
    assert row["a"] == [pytest.approx(0.0), pytest.approx(-0.02)]
    assert row["b"] == [pytest.approx(-0.10), pytest.approx(-0.14)]
    assert row["mean_diff"] == pytest.approx(0.11)


def test_the_table_reads_only_the_current_matrix(tmp_path: Path) -> None:
    settings = {"dataset_names": ["fsdd"], "method_names": ["fedavg", "fml"], "scenarios": ["clean"], "seeds": 1,
                "claims": [{"id": "c", "claim": "fml beats fedavg", "datasets": ["fsdd"], "scenarios": ["clean"],
                            "metric": "personalised", "method": "fml", "against": ["fedavg"],
                            "favourable": "positive", "seeds": 2}]}
    for seed in (0, 1):
        _write(tmp_path, Run("fsdd", "fml", "clean", seed), {0: 0.9, 1: 0.8 - 0.1 * seed}, [])
        _write(tmp_path, Run("fsdd", "fedavg", "clean", seed), {0: 0.3, 1: 0.3}, [])
    # stale results: a seed beyond the claim's, a method and a scenario no longer in the matrix, the old layout
    _write(tmp_path, Run("fsdd", "fml", "clean", 2), {0: 0.0, 1: 0.0}, [])
    _write(tmp_path, Run("fsdd", "fedprox", "clean", 0), {0: 0.0, 1: 0.0}, [])
    _write(tmp_path, Run("fsdd", "fml", "label_flip-0.4", 0), {0: 0.0, 1: 0.0}, [])
    (tmp_path / "fsdd" / "fml" / "clean" / "metrics.json").write_text(json.dumps({"personalised_accuracy_mean": 0}))
    table = build_table(settings, tmp_path)
    assert table["runs"] == table["finished"] == 4
    fml = table["summaries"][("fsdd", "fml", "clean")]["personalised"]
    assert fml["values"] == [pytest.approx(0.85), pytest.approx(0.80)] and fml["n"] == 2
    assert fml["mean"] == pytest.approx(0.825) and fml["sd"] == pytest.approx(0.0353553, abs=1e-6)
    assert table["claims"][0]["rows"][0]["mean_diff"] == pytest.approx(0.525)
    assert set(table["summaries"]) == {("fsdd", "fedavg", "clean"), ("fsdd", "fml", "clean")}

    text = markdown_tables(table["summaries"], settings)
    assert "| fml | 0.825 ± 0.035 (2) |" in text and "| fedavg | 0.300 ± 0.000 (2) |" in text
    assert "fedprox" not in text and "label_flip-0.4" not in text
    plot_comparison(table["summaries"], settings, tmp_path / "comparison.png")
    assert (tmp_path / "comparison.png").stat().st_size > 5000


def test_the_tables_show_benign_poisoned_and_global_apart(tmp_path: Path) -> None:
    settings = {"dataset_names": ["fsdd"], "method_names": ["fml", "local"],
                "scenarios": ["clean", "label_flip-0.2"], "seeds": 1, "claims": []}
    _write(tmp_path, Run("fsdd", "fml", "clean", 0), {0: 0.9, 1: 0.8, 2: 0.7}, [], glob=0.5)
    _write(tmp_path, Run("fsdd", "fml", "label_flip-0.2", 0), {0: 0.85, 1: 0.8, 2: 0.1}, [2], glob=0.4)
    text = markdown_tables(build_table(settings, tmp_path)["summaries"], settings)
    sections = text.split("**")
    def row(title: str, method: str) -> str:
        part = sections[sections.index(title) + 1]
        return next(line for line in part.splitlines() if line.startswith(f"| {method} "))
    assert row("Personalised accuracy, all clients", "fml") == "| fml | 0.800 | 0.583 |"
    assert row("Personalised accuracy, benign clients (change against the same clients clean)", "fml") == \
        "| fml | 0.800 | 0.825<br>Δ -0.025 |"
    assert row("Personalised accuracy, poisoned clients", "fml") == "| fml | — | 0.100 |"
    assert row("Shared (global) model's test accuracy", "fml") == "| fml | 0.500 | 0.400 |"
    assert row("Shared (global) model's test accuracy", "local") == "| local | not run | not run |"
