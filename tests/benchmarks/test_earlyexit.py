"""Early-exit benchmark: override layering, cells × seeds, compute saved against full, the table and the claims."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.benchlib import read_matrix_params
from benchmarks.earlyexit.driver import (
    Cell,
    cell_folder,
    cell_params,
    claims,
    collect,
    markdown_table,
    planned_cells,
    seed_differences,
    settings_of,
)
from fedcore.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "benchmarks/earlyexit"
PARAMS = FOLDER / "params.yaml"
T_0975_2 = 4.302653  # Student's t quantile t_{0.975, 2} (3 seeds)


def _settings() -> dict[str, Any]:
    return settings_of(yaml.safe_load(PARAMS.read_text()))


def _raw() -> dict[str, Any]:
    return read_matrix_params(PARAMS, "eebench")[0]


def test_cells_layer_init_variant_and_seed_over_common() -> None:
    params = cell_params(_raw(), _settings(), "early_exit_weak", "ssl", seed=3)
    assert params.model.name == "transformer" and params.earlyexit.plan == "early_exit"
    assert params.earlyexit.weighting == "depth" and params.earlyexit.tiers[0] == {"share": 0.5, "depth": 2}
    assert params.earlyexit.init.endswith("pretrain/model.safetensors")
    assert (params.partition.seed, params.federation.seed, params.earlyexit.seed) == (3, 3, 3)
    assert params.earlyexit.registered_model == "ee-ssl-early_exit_weak-seed3"
    assert params.earlyexit.stop == "plateau" and params.federation.rounds == 100
    assert cell_params(_raw(), _settings(), "early_exit", "ssl").earlyexit.exit_norm == "per_exit"
    assert cell_params(_raw(), _settings(), "early_exit_shared_norm", "ssl").earlyexit.exit_norm == "shared"
    assert cell_params(_raw(), _settings(), "full", "random").earlyexit.init == "random"
    with pytest.raises(ConfigError, match="variants"):
        cell_params(_raw(), _settings(), "nope", "ssl")


def test_the_matrix_expands_claim_cells_over_every_seed() -> None:
    settings = _settings()
    seeds = settings["seeds"]
    assert len(seeds) >= 3 and set(settings["variant_names"]) == {"early_exit", "full", "drop_weak"}
    cells = planned_cells(settings)
    for variant in settings["variant_names"]:
        assert {c.seed for c in cells if c.variant == variant and c.init == "ssl"} == set(seeds)
    assert {c for c in cells if c.variant not in settings["variant_names"]} == {
        Cell("ssl", v, s) for v in settings["context_names"] for s in settings["context_seeds"]}
    assert [c for c in cells if c.init == "random"] == [Cell("random", "full", settings["pretrain_seed"])]
    assert len(cells) == len(set(cells)) == 3 * len(seeds) + len(settings["context_names"]) + 1


def test_dvc_yaml_runs_exactly_the_planned_cells() -> None:
    from dvc.repo import Repo

    with Repo(str(FOLDER)) as repo:
        metrics = {Path(o.fs_path).resolve().relative_to(FOLDER).as_posix()
                   for stage in repo.index.stages for o in stage.outs if o.metric}
    planned = {(cell_folder(Path("results"), c.init, c.variant, c.seed) / "metrics.json").as_posix()
               for c in planned_cells(_settings())}
    assert metrics - {"results/pretrain/metrics.json"} == planned


def test_bad_seeds_and_claims_fail_before_any_work() -> None:
    settings = _settings()
    with pytest.raises(ConfigError, match="seeds"):
        settings_of({"eebench": {**settings, "seeds": [0]}})
    with pytest.raises(ConfigError, match="pretrain_seed"):
        settings_of({"eebench": {**settings, "pretrain_seed": 9}})
    with pytest.raises(ConfigError, match="claim cells"):
        settings_of({"eebench": {**settings, "claims": [{"claim": "x", "a": "early_exit_weak", "b": "full",
                                                          "metric": "final"}]}})
    with pytest.raises(ConfigError, match="metric"):
        settings_of({"eebench": {**settings, "claims": [{"claim": "x", "a": "early_exit", "b": "full",
                                                          "metric": "speed"}]}})


def _cell(root: Path, init: str, variant: str, seed: int, tiers: list[int], depths: list[int | None],
          per_tier: dict[int, float], final: float, rounds: int = 30) -> None:
    folder = cell_folder(root, init, variant, seed)
    folder.mkdir(parents=True)
    metrics = {"plan": variant, "weighting": "depth", "client_tiers": tiers, "client_depths": depths,
               "exit2_accuracy": 0.5, "exit4_accuracy": final, "final_exit_accuracy": final, "bytes_up_total": 1,
               "rounds": rounds, "stop_reason": "plateau",
               **{f"tier{t}_gflops_per_round": v for t, v in per_tier.items()}}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def _small_settings() -> dict[str, Any]:
    return {**_settings(), "seeds": [0, 1, 2], "context_names": [], "pretrain_seed": 0}


TIERS = [2, 2, 4, 4]


def _seed(root: Path, seed: int, full: float, early: float, drop: float, early_rounds: int = 30) -> None:
    _cell(root, "ssl", "full", seed, TIERS, [4, 4, 4, 4], {2: 4.0, 4: 4.0}, full)
    _cell(root, "ssl", "early_exit", seed, TIERS, [2, 2, 4, 4], {2: 2.0, 4: 4.0}, early, early_rounds)
    _cell(root, "ssl", "drop_weak", seed, TIERS, [None, None, 4, 4], {4: 4.0}, drop)


def test_compute_is_averaged_over_every_client_and_compared_with_full(tmp_path: Path) -> None:
    _seed(tmp_path, 0, 0.90, 0.89, 0.80, early_rounds=20)
    rows = {r["variant"]: r for r in collect(tmp_path, _small_settings())[0]}
    assert rows["early_exit"]["client_gflops"] == pytest.approx(3.0)     # (2+2+4+4)/4
    assert rows["drop_weak"]["client_gflops"] == pytest.approx(2.0)      # the weak clients spend nothing
    assert rows["early_exit"]["compute_saved"] == pytest.approx(0.25)
    assert rows["early_exit"]["total_gflops"] == pytest.approx(60.0)     # 3.0 × 20 rounds
    assert rows["early_exit"]["total_compute_saved"] == pytest.approx(1 - 60 / 120)
    assert rows["early_exit"]["accuracy_lost"] == pytest.approx(0.01)


def test_claims_give_the_paired_interval_and_verdict_of_hand_made_seeds(tmp_path: Path) -> None:
    settings = _small_settings()
    finals = [(0.90, 0.89, 0.80), (0.88, 0.88, 0.82), (0.91, 0.89, 0.78)]  # (full, early_exit, drop_weak)
    for seed, (full, early, drop) in enumerate(finals):
        _seed(tmp_path, seed, full, early, drop, early_rounds=[20, 30, 40][seed])
    rows, missing = collect(tmp_path, settings)
    assert str(cell_folder(tmp_path, "random", "full", 0)) in missing and len(missing) == 1
    parts = {c["metric"] + ":" + c["b"]: c for c in claims(rows, settings)}
    # per round: d = 1 - 3/4 = 0.25 on every seed (sd 0): the interval is the point 0.25 < 0.40: does not hold.
    c = parts["compute_saved:full"]
    assert (c["mean_diff"], c["low"], c["high"]) == pytest.approx((0.25, 0.25, 0.25))
    assert c["verdict"] == "does not hold"
    # to the stop: d = 1 - 3r/(4·30) for r = 20, 30, 40: [0.5, 0.25, 0.0], mean 0.25, sd 0.25 → spans 0.40.
    c = parts["total_compute_saved:full"]
    assert c["mean_diff"] == pytest.approx(0.25)
    assert (c["low"], c["high"]) == pytest.approx((0.25 - T_0975_2 * 0.25 / math.sqrt(3),
                                                   0.25 + T_0975_2 * 0.25 / math.sqrt(3)), abs=1e-6)
    assert c["verdict"] == "unresolved"
    # final vs full, margin -0.02: d = [-0.01, 0, -0.02], mean -0.01, sd 0.01 → [-0.0348, 0.0148] spans -0.02.
    c = parts["final:full"]
    assert c["mean_diff"] == pytest.approx(-0.01) and c["margin"] == -0.02
    assert c["low"] == pytest.approx(-0.01 - T_0975_2 * 0.01 / math.sqrt(3), abs=1e-6)
    assert c["verdict"] == "unresolved" and c["note"] == "needs 5 seeds (has 3)"
    # vs drop_weak: d = [0.09, 0.06, 0.11], mean 0.0867 → the interval lies above 0: holds.
    c = parts["final:drop_weak"]
    assert c["mean_diff"] == pytest.approx((0.09 + 0.06 + 0.11) / 3) and c["low"] > 0
    assert c["verdict"] == "holds" and c["note"] == ""
    assert seed_differences(rows, "early_exit", "full", "final") == pytest.approx({0: -0.01, 1: 0.0, 2: -0.02})
    text = markdown_table(rows, claims(rows, settings), missing)
    assert "| ssl | early_exit | 3 | 0.500 ± 0.000 | 0.887 ± 0.006 | 0.887 ± 0.006 | 3.000 ± 0.000 |" in text
    assert "(vs full): **does not hold** (3 parts)" in text
    assert "beat the feasible baseline drop_weak at the final exit: **holds** (1 parts)" in text


def test_the_table_reads_only_the_cells_of_the_current_matrix(tmp_path: Path) -> None:
    settings = _small_settings()
    _seed(tmp_path, 0, 0.90, 0.89, 0.80)
    _seed(tmp_path, 9, 0.10, 0.10, 0.10)                                 # a seed no longer in the matrix
    _cell(tmp_path, "ssl", "ee_uniform", 0, TIERS, [2, 2, 4, 4], {2: 1.0, 4: 1.0}, 0.1)  # a dropped variant
    old = tmp_path / "cells" / "ssl" / "full" / "metrics.json"           # the layout before seeds
    old.write_text(json.dumps({"final_exit_accuracy": 0.0}))
    rows, missing = collect(tmp_path, settings)
    assert sorted((r["variant"], r["seed"]) for r in rows) == [("drop_weak", 0), ("early_exit", 0), ("full", 0)]
    assert len(missing) == len(planned_cells(settings)) - 3
    assert "0.100" not in markdown_table(rows, claims(rows, settings), missing)
