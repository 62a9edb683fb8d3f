"""FASSL benchmark settings and table: override layering, the central baseline, the matrix of cells × seeds (the
same runs as dvc.yaml), the claims' paired intervals and verdicts, and a table that reads only the current cells."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks.benchlib import read_matrix_params
from benchmarks.fassl.driver import (
    CENTRAL,
    Cell,
    cell_params,
    claims_of,
    collect,
    evaluate_claim,
    main,
    markdown_table,
    matrix_cells,
    settings_of,
    table_rows,
)
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
    assert "fedu" not in settings["aggregator_names"] and "byol" in settings["methods"]
    assert settings["fedu_methods"] == ["byol"] and settings["fedu_arms"] == ["fedavg", "fedu"]
    for method in settings["fedu_methods"]:
        params = cell_params(_raw(), settings, method, "fedu", "all")
        assert params.ssl.method == "byol" and params.federation.local_algorithm == "fedu"
        assert params.federation.aggregator == "fedavg" and params.federation.send == "all"
        assert params.fedu.predictor == "predictor" and params.fedu.mu_scale == "relative"
    stage = yaml.safe_load((PARAMS.parent / "dvc.yaml").read_text())["stages"]["fedu"]
    assert stage["matrix"]["method"] == "${fassl.fedu_methods}" and "--send all" in stage["cmd"]
    for method in ("simclr", "barlow_twins", "acop"):  # no predictor: refused at params check
        with pytest.raises(ConfigError, match="fedu needs ssl.method byol"):
            cell_params(_raw(), settings, method, "fedu", "all")


def test_central_is_one_client_holding_the_pool_with_the_same_budget() -> None:
    federated = cell_params(_raw(), _settings(), "simclr", "fedavg", "all")
    central = cell_params(_raw(), _settings(), "simclr", CENTRAL, "all")
    assert central.partition.num_clients == 1 and central.partition.scheme == "iid"
    for key in ("local_epochs", "batch_size", "lr"):
        assert getattr(central.federation, key) == getattr(federated.federation, key)
    # the same passes over the pool: 80 rounds x 10% of it against 8 rounds of all of it; as many scorings
    fed, cen = federated.federation, central.federation
    assert fed.rounds * fed.client_fraction == cen.rounds * cen.client_fraction == 8
    assert fed.rounds // federated.downstream.every == cen.rounds // central.downstream.every == 8


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="'nope' must be one of"):
        cell_params(_raw(), _settings(), "nope", "fedavg", "all")
    bad = {"fassl": {"method_names": ["simclr", "ghost"], "methods": {"simclr": {}}}}
    with pytest.raises(ConfigError, match="'ghost'"):
        settings_of(bad)


def test_the_cross_device_setting_gives_every_client_the_former_local_epochs() -> None:
    params = cell_params(_raw(), _settings(), "simclr", "fedavg", "all", seed=3)
    fed, part = params.federation, params.partition
    assert part.num_clients == 100 and fed.client_fraction == 0.1 and part.scheme == "dirichlet"
    assert fed.rounds * fed.client_fraction * fed.local_epochs == 8  # rounds a client takes part in × epochs
    assert part.seed == 3 and fed.seed == 3  # fassl.seed_keys
    assert params.downstream.seed == 0 and params.downstream.registered_model == "fassl-simclr-fedavg-all-seed3"
    central = cell_params(_raw(), _settings(), "simclr", CENTRAL, "all", seed=3)
    assert central.federation.rounds * central.federation.local_epochs == 8  # the same passes over the pool
    assert central.federation.client_fraction == 1.0 and central.federation.seed == 3
    fairavg = cell_params(_raw(), _settings(), "acop", "fairavg", "all", seed=0)
    assert fairavg.federation.aggregator == "fairavg"


def test_the_matrix_expands_to_the_claim_cells_over_every_seed_and_the_rest_over_one() -> None:
    settings = _settings()
    cells = matrix_cells(settings)
    assert len(cells) == len(set(cells)) == 64
    seeds: dict[str, list[int]] = {}
    for cell in cells:
        seeds.setdefault(cell.name, []).append(cell.seed)
    five, one = [0, 1, 2, 3, 4], [0]
    methods = ("simclr", "barlow_twins", "acop")
    expected = {f"{m}/fedavg/{s}": five for m in methods for s in ("all", "backbone")}
    expected |= {f"{m}/{CENTRAL}/all": five for m in methods}
    expected |= {"byol/fedavg/all": five, "byol/fedu/all": five}
    expected |= {f"{m}/{a}/all": one for m in methods for a in ("fairavg", "ldawa", "loss")}
    assert seeds == expected
    claimed = {n for c in claims_of(settings) for arm in ("a", "b") for n in c[arm]["cells"]}
    assert all(len(seeds[n]) >= 3 for n in claimed)  # every cell that carries a claim runs >= 3 seeds


def test_dvc_runs_exactly_the_drivers_matrix() -> None:
    from dvc.repo import Repo

    runs = set()
    with Repo(str(PARAMS.parent)) as repo:
        for stage in repo.index.stages:
            words = stage.cmd.split()
            if "cell" not in words:
                continue
            arg = {w: words[i + 1] for i, w in enumerate(words) if w.startswith("--")}
            cell = Cell(arg["--method"], arg["--aggregator"], arg["--send"], int(arg["--seed"]))
            runs.add(cell)
            folder = f"results/cells/{cell.method}/{cell.aggregator}/{cell.send}/seed{cell.seed}"
            assert {Path(o.def_path).as_posix() for o in stage.outs} >= {f"{folder}/selection.json",
                                                                        f"{folder}/metrics.json"}
    assert runs == set(matrix_cells(_settings()))


def test_a_claim_naming_a_cell_outside_the_matrix_or_one_seed_is_refused() -> None:
    settings = _settings()
    bad = {**settings, "claims": [{"name": "x", "claim": "x", "metric": "best_test",
                                   "a": {"cells": ["simclr/fedu/all"], "task": "mean"},
                                   "b": {"cells": ["simclr/fairavg/all"], "task": "mean"}}]}
    with pytest.raises(ConfigError, match="'simclr/fedu/all' is not a cell of the matrix"):
        claims_of(bad)
    bad["claims"][0]["a"]["cells"] = ["simclr/ldawa/all"]
    with pytest.raises(ConfigError, match="share 1 seed"):
        claims_of(bad)


def _run(root: Path, cell: Cell, tasks: dict[str, tuple[float, int]], floor: float = 0.5) -> None:
    """A finished run: per task (best_test, best_round)."""
    folder = root / "cells" / cell.method / cell.aggregator / cell.send / f"seed{cell.seed}"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"rounds": 80}))
    sel = {t: {"best_round": r, "best_test": v, "last_round": 80, "last_test": v - 0.01, "floor_test": floor}
           for t, (v, r) in tasks.items()}
    (folder / "selection.json").write_text(json.dumps({"metric": "knn1", "tasks": sel}))


def _claim(a: str, b: str, task: str = "t", metric: str = "best_test", **extra: object) -> dict[str, object]:
    return {"name": "c", "claim": "a beats b", "metric": metric, "a": {"cells": [a], "task": task},
            "b": {"cells": [b], "task": task}, **extra}


def test_a_claim_gives_the_paired_t_interval_and_verdict_of_hand_made_seeds(tmp_path: Path) -> None:
    a, b = Cell("acop", "fedavg", "all", 0), Cell("simclr", "fedavg", "all", 0)
    # five seeds, a − b = 0.02, 0.03, 0.04, 0.05, 0.06: mean 0.04, s_d = 0.0158114, t_{0.975,4} = 2.776445
    for seed, diff in enumerate([0.02, 0.03, 0.04, 0.05, 0.06]):
        _run(tmp_path, a._replace(seed=seed), {"t": (0.7 + diff, 10), "u": (0.5, 70)})
        _run(tmp_path, b._replace(seed=seed), {"t": (0.7, 10), "u": (0.5, 20)})
    runs = collect(tmp_path, matrix_cells(_settings()))
    row = evaluate_claim(_claim(a.name, b.name), runs)
    half = 2.776445 * 0.0158114 / 5**0.5  # 0.019633
    assert row["seeds"] == [0, 1, 2, 3, 4] and row["mean_diff"] == pytest.approx(0.04)
    assert row["low"] == pytest.approx(0.04 - half, abs=1e-6) and row["high"] == pytest.approx(0.04 + half, abs=1e-6)
    assert row["verdict"] == "holds"
    assert evaluate_claim(_claim(b.name, a.name), runs)["verdict"] == "does not hold"
    # the mean over tasks: a − b = (diff + 0) / 2
    assert evaluate_claim(_claim(a.name, b.name, task="mean"), runs)["mean_diff"] == pytest.approx(0.02)
    # best round of task u against task t in the same cell: 60 on every seed (sd 0: a point interval)
    rounds = evaluate_claim({**_claim(a.name, a.name, metric="best_round"), "a": {"cells": [a.name], "task": "u"}},
                            runs)
    assert (rounds["mean_diff"], rounds["low"], rounds["high"], rounds["verdict"]) == (60, 60, 60, "holds")


def test_a_claim_within_one_sd_is_unresolved_and_a_margin_makes_closeness_hold(tmp_path: Path) -> None:
    a, b = Cell("acop", "fedavg", "all", 0), Cell("acop", CENTRAL, "all", 0)
    # three seeds, a − b = −0.01, 0.00, 0.01: mean 0, s_d 0.01, t_{0.975,2} = 4.302653: ± 0.024841
    for seed, diff in enumerate([-0.01, 0.0, 0.01]):
        _run(tmp_path, a._replace(seed=seed), {"t": (0.6 + diff, 10)})
        _run(tmp_path, b._replace(seed=seed), {"t": (0.6, 10)})
    runs = collect(tmp_path, matrix_cells(_settings()))
    row = evaluate_claim(_claim(a.name, b.name), runs)
    assert row["low"] == pytest.approx(-0.024841, abs=1e-6) and row["high"] == pytest.approx(0.024841, abs=1e-6)
    assert row["verdict"] == "unresolved"
    # "a is at most 0.03 below b": the interval of a − b + 0.03 is [0.005, 0.055]
    assert evaluate_claim(_claim(a.name, b.name, margin=0.03), runs)["verdict"] == "holds"
    # one seed only: no interval
    one = {c: r for c, r in runs.items() if c.seed == 0}
    assert evaluate_claim(_claim(a.name, b.name), one)["verdict"] == "pending"


def test_the_table_reads_only_the_cells_of_the_current_matrix(tmp_path: Path) -> None:
    # A former matrix's folders: no seed level, and a cell no longer in the matrix (FedU over SimCLR).
    for old in (tmp_path / "results/cells/simclr/fedu/all", tmp_path / "results/cells/simclr/fedavg/all"):
        old.mkdir(parents=True)
        (old / "metrics.json").write_text("{}")
        (old / "selection.json").write_text(json.dumps({"metric": "knn1", "tasks": {
            "t": {"best_round": 1, "best_test": 0.1, "last_round": 8, "last_test": 0.1, "floor_test": 0.5}}}))
    _run(tmp_path / "results", Cell("simclr", "fedu", "all", 0), {"t": (0.2, 1)})  # not a cell of the matrix
    for seed in (0, 1):
        _run(tmp_path / "results", Cell("simclr", "fedavg", "all", seed), {"t": (0.9 - 0.02 * seed, 20)})
    _run(tmp_path / "results", Cell("acop", "ldawa", "all", 0), {"t": (0.7, 30)})
    runs = collect(tmp_path / "results", matrix_cells(_settings()))
    assert sorted(runs) == [Cell("acop", "ldawa", "all", 0), Cell("simclr", "fedavg", "all", 0),
                            Cell("simclr", "fedavg", "all", 1)]
    tasks, rows = table_rows(runs)
    assert tasks == ["t"] and [(r["method"], r["aggregator"], r["seeds"]) for r in rows] == [
        ("simclr", "fedavg", [0, 1]), ("acop", "ldawa", [0])]
    text = markdown_table(tasks, rows, "knn1")
    assert "| random init (floor) | — | — | — | 0.500 | 0.500 | — |" in text
    assert "| simclr | fedavg | all | 2 | 0.890 ± 0.014 (r20.0 ± 0.0) | 0.890 ± 0.014 | 0.880 ± 0.014 |" in text
    assert "| acop | ldawa | all | 1 | 0.700 (r30.0) | 0.700 | 0.690 |" in text
    # the table command, from the matrix folder's params: the claims pending, the missing runs listed
    main(["table", "--params", str(PARAMS), "--results", str(tmp_path / "results"), "--out", str(tmp_path)])
    table = json.loads((tmp_path / "table.json").read_text())
    assert len(table["rows"]) == 2 and {c["verdict"] for c in table["claims"]} == {"pending"}
    assert len(table["missing"]) == 64 - 3 and "0.1" not in (tmp_path / "table.md").read_text().split("## Claims")[0]
