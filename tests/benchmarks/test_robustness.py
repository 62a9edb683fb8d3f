"""Robustness benchmark: scenario names, per-run params, the expansion to cells × seeds, claims and the table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.benchlib import read_matrix_params
from benchmarks.robustness.driver import (
    Cell,
    Run,
    cell_params,
    cell_summary,
    collect,
    evaluate_claim,
    expand,
    load_claims,
    parse_scenario,
    plan_text,
    plot_drops,
    seed_dir,
    seed_overrides,
    seeds_of,
    tabulate,
)
from fedcore.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "benchmarks/robustness/params.yaml"
KEYS = ["partition.seed", "federation.seed", "attack.seed"]


def _settings(**extra: Any) -> dict[str, Any]:
    """A 2 × 3 matrix with one claim (lpa vs fedavg under sign flip, on the change against clean)."""
    return {"aggregators": ["fedavg", "lpa"], "scenarios": ["clean", "sign_flip-0.2", "alie-0.2"],
            "seeds": [0, 1, 2], "seed_keys": KEYS, "overrides": {},
            "claims": [{"name": "sf", "claim": "LPA loses less", "a": "lpa/sign_flip-0.2",
                        "b": "fedavg/sign_flip-0.2", "metric": "change", "favourable": "positive"}], **extra}


def _write(root: Path, cell: Cell, seed: int, accuracy: float, **metrics: Any) -> None:
    folder = seed_dir(root, cell, seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"global_accuracy": accuracy, **metrics}))


def test_scenarios_parse_and_bad_ones_are_clear_errors() -> None:
    assert parse_scenario("clean") == ("none", 0.0)
    assert parse_scenario("sign_flip-0.2") == ("sign_flip", 0.2)
    for bad in ("sign_flip", "alie-2", "-0.2", "x-y"):
        with pytest.raises(ConfigError, match="scenario"):
            parse_scenario(bad)


def test_cell_params_apply_overrides_then_the_seed_then_the_cell() -> None:
    raw = read_matrix_params(PARAMS, "robustness")[0]
    bench = yaml.safe_load(PARAMS.read_text())["robustness"]
    params = cell_params(raw, bench["overrides"], "lpa", "sign_flip-0.2", seed_overrides(bench, 2))
    assert params.federation.aggregator == "lpa" and params.attack.name == "sign_flip"
    assert params.attack.client_fraction == 0.2
    assert params.federation.rounds == bench["overrides"]["federation.rounds"]
    assert params.model.width == bench["overrides"]["model.width"]
    assert params.partition.seed == params.federation.seed == params.attack.seed == 2
    seed0 = cell_params(raw, bench["overrides"], "fedavg", "clean", seed_overrides(bench, 0))
    assert seed0.partition == cell_params(raw, {}, "lpa", "clean").partition  # seed 0: the default run's data
    with pytest.raises(ConfigError, match="aggregator"):
        cell_params(raw, {}, "nope", "clean")
    with pytest.raises(ConfigError, match="attack"):
        cell_params(raw, {}, "fedavg", "nope-0.2")


def test_the_committed_matrix_is_valid_and_its_claim_cells_run_every_seed() -> None:
    raw = read_matrix_params(PARAMS, "robustness")[0]
    bench = yaml.safe_load(PARAMS.read_text())["robustness"]
    claims = load_claims(bench)
    assert claims and len(bench["seeds"]) >= 3
    runs = expand(bench)
    for claim in claims:
        for cell in claim.cells():
            assert seeds_of(runs, cell) == bench["seeds"], cell
    for run in runs:  # every run is a valid set of params
        cell_params(raw, bench["overrides"], run.cell.aggregator, run.cell.scenario, seed_overrides(bench, run.seed))
    assert "runs" in plan_text(bench, bench["minutes_per_run"])


def test_expansion_runs_claim_cells_over_every_seed_and_the_rest_once() -> None:
    settings = _settings()
    runs = expand(settings)
    claimed = {Cell("lpa", "sign_flip-0.2"), Cell("fedavg", "sign_flip-0.2"), Cell("lpa", "clean"),
               Cell("fedavg", "clean")}
    assert {r.cell for r in runs} == {Cell(a, s) for a in settings["aggregators"] for s in settings["scenarios"]}
    for cell in {r.cell for r in runs}:
        assert seeds_of(runs, cell) == ([0, 1, 2] if cell in claimed else [0]), cell
    assert len(runs) == 4 * 3 + 2 * 1
    # A claim on the accuracy itself reads only its two arms.
    only_arms = _settings(claims=[{"name": "x", "a": "lpa/alie-0.2", "b": "fedavg/alie-0.2",
                                   "metric": "global_accuracy"}])
    assert len(expand(only_arms)) == 2 * 3 + 4 * 1
    assert len(expand(_settings(claims=[]))) == 6
    assert "14 runs" in plan_text(settings, 4.0) and "0.93 h" in plan_text(settings, 4.0)


@pytest.mark.parametrize(("change", "match"), [
    ({"seeds": [0, 1]}, "at least 3"),
    ({"seeds": [0, 0, 1]}, "distinct"),
    ({"claims": [{"name": "x", "a": "krum/sign_flip-0.2", "b": "fedavg/sign_flip-0.2"}]}, "outside the matrix"),
    ({"claims": [{"name": "x", "a": "lpa/clean", "b": "fedavg/clean"}]}, "clean arm"),
    ({"claims": [{"name": "x", "a": "lpa/alie-0.2", "b": "fedavg/alie-0.2", "metric": "auc"}]}, "metric"),
    ({"claims": [{"name": "x", "a": "lpa", "b": "fedavg/alie-0.2"}]}, "aggregator>/<scenario"),
    ({"claims": [{"name": "x", "a": "lpa/alie-0.2", "b": "fedavg/alie-0.2", "metrc": "change"}]}, "unknown keys"),
])
def test_bad_claims_and_seeds_are_clear_errors(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        expand(_settings(**change))


def test_a_claims_interval_and_verdict_match_a_hand_computation() -> None:
    settings = _settings()
    claim = load_claims(settings)[0]
    accuracy = {("lpa", "clean"): [0.90, 0.92, 0.88], ("lpa", "sign_flip-0.2"): [0.88, 0.91, 0.85],
                ("fedavg", "clean"): [0.91, 0.90, 0.89], ("fedavg", "sign_flip-0.2"): [0.11, 0.20, 0.10]}
    results = {Run(Cell(*cell), s): {"global_accuracy": v} for cell, values in accuracy.items()
               for s, v in enumerate(values)}
    row = evaluate_claim(claim, results)
    # Changes: lpa [-0.02, -0.01, -0.03], fedavg [-0.80, -0.70, -0.79]; d = [0.78, 0.69, 0.76], mean 0.743333,
    # s_d = sqrt((0.036667² + 0.053333² + 0.016667²) / 2) = 0.047258, t_{0.975, 2} = 4.302653,
    # half width = 4.302653 · 0.047258 / √3 = 0.117397.
    assert row["seeds"] == [0, 1, 2]
    assert row["differences"] == pytest.approx([0.78, 0.69, 0.76])
    assert row["mean_diff"] == pytest.approx(0.743333, abs=1e-6)
    assert row["low"] == pytest.approx(0.743333 - 0.117397, abs=1e-5)
    assert row["high"] == pytest.approx(0.743333 + 0.117397, abs=1e-5)
    assert row["verdict"] == "holds"
    # Differences of both signs: the interval spans 0.
    mixed = dict(results)
    mixed[Run(Cell("fedavg", "sign_flip-0.2"), 1)] = {"global_accuracy": 0.99}
    mixed[Run(Cell("fedavg", "sign_flip-0.2"), 2)] = {"global_accuracy": 0.60}
    assert evaluate_claim(claim, mixed)["verdict"] == "unresolved"
    # FedAvg losing less on every seed: the claim does not hold.
    # (lpa changes [-0.85, -0.76, -0.84]: d = [-0.05, -0.06, -0.05], interval [-0.068, -0.039])
    lpa_attacked = {0: 0.05, 1: 0.16, 2: 0.04}
    reversed_ = {r: ({"global_accuracy": lpa_attacked[r.seed]} if r.cell == Cell("lpa", "sign_flip-0.2") else m)
                 for r, m in results.items()}
    assert evaluate_claim(claim, reversed_)["verdict"] == "does not hold"
    # A seed missing its clean run is left out of the pairs; under 2 pairs there is no interval.
    del results[Run(Cell("lpa", "clean"), 1)], results[Run(Cell("lpa", "clean"), 2)]
    row = evaluate_claim(claim, results)
    assert row["seeds"] == [0] and row["verdict"] == "not run" and row["low"] is None


def test_the_table_reads_only_the_current_cells_and_seeds(tmp_path: Path) -> None:
    settings = _settings()
    for seed, (lc, ls, fc, fs) in enumerate([(0.90, 0.88, 0.91, 0.11), (0.92, 0.91, 0.90, 0.20),
                                             (0.88, 0.85, 0.89, 0.10)]):
        _write(tmp_path, Cell("lpa", "clean"), seed, lc)
        _write(tmp_path, Cell("lpa", "sign_flip-0.2"), seed, ls, detect_precision=1.0, detect_recall=0.5 + seed / 10)
        _write(tmp_path, Cell("fedavg", "clean"), seed, fc)
        _write(tmp_path, Cell("fedavg", "sign_flip-0.2"), seed, fs, detect_precision=None, detect_recall=0.0)
    _write(tmp_path, Cell("lpa", "alie-0.2"), 0, 0.87)
    # Left over from older matrices: a rule no longer in the axes, a seed a non-claim cell does not run, a scenario
    # no longer in the axes, and the old one-seed layout (results/A/S/metrics.json).
    _write(tmp_path, Cell("krum", "clean"), 0, 0.17)
    _write(tmp_path, Cell("lpa", "alie-0.2"), 1, 0.01)
    _write(tmp_path, Cell("fedavg", "nan-0.4"), 0, 0.42)
    (tmp_path / "fedavg" / "alie-0.2").mkdir(parents=True)
    (tmp_path / "fedavg" / "alie-0.2" / "metrics.json").write_text(json.dumps({"global_accuracy": 0.59}))
    runs = expand(settings)
    assert set(collect(tmp_path, runs)) <= set(runs)
    rows, claims, text = tabulate(settings, tmp_path)
    lines = text.splitlines()
    assert lines[0] == "| aggregator | clean | sign_flip-0.2 | alie-0.2 |"
    assert "krum" not in text and "nan-0.4" not in text
    assert lines[2].startswith("| fedavg | 0.900 ± 0.010<br>3/3 seeds | 0.137 ± 0.055 (-0.763 ± 0.055)<br>3/3 seeds"
                               "<br>P — R 0.00 ± 0.00 | not run |")
    assert lines[3].startswith("| lpa | 0.900 ± 0.020<br>3/3 seeds | 0.880 ± 0.030 (-0.020 ± 0.010)<br>3/3 seeds"
                               "<br>P 1.00 ± 0.00 R 0.60 ± 0.10 | 0.870 (-0.030)<br>P — R — |")
    assert [c["verdict"] for c in claims] == ["holds"] and "### Claims" in text
    assert "| LPA loses less | lpa/sign_flip-0.2 − fedavg/sign_flip-0.2" in text and "[+0.626, +0.861]" in text
    by_cell = {(r["aggregator"], r["scenario"]): r for r in rows}
    assert by_cell[("lpa", "alie-0.2")]["done"] == [0] and by_cell[("fedavg", "alie-0.2")]["done"] == []
    summary = cell_summary(collect(tmp_path, runs), Cell("lpa", "clean"), [0, 1, 2])
    assert summary["seeds"] == 3 and summary["mean"] == pytest.approx(0.90)
    plot_drops(rows, settings["aggregators"], settings["scenarios"], tmp_path / "drop.png")
    assert (tmp_path / "drop.png").stat().st_size > 1000
    assert not math.isnan(by_cell[("lpa", "sign_flip-0.2")]["change"]["mean"])
