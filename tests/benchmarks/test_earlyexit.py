"""Early-exit benchmark settings and table: override layering, compute saved against the full plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks.benchlib import read_matrix_params
from benchmarks.earlyexit.driver import cell_folder, cell_params, collect, markdown_table, settings_of
from fedcore.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "benchmarks/earlyexit/params.yaml"


def _settings() -> dict[str, object]:
    return settings_of(yaml.safe_load(PARAMS.read_text()))


def _raw() -> dict[str, object]:
    return read_matrix_params(PARAMS, "eebench")[0]


def test_cells_layer_init_and_variant_over_common() -> None:
    params = cell_params(_raw(), _settings(), "ee_depth_weak", "ssl")
    assert params.model.name == "transformer" and params.earlyexit.plan == "early_exit"
    assert params.earlyexit.weighting == "depth" and params.earlyexit.tiers[0] == {"share": 0.5, "depth": 2}
    assert params.earlyexit.init.endswith("pretrain/model.safetensors")
    assert cell_params(_raw(), _settings(), "full", "random").earlyexit.init == "random"
    assert params.earlyexit.registered_model == "ee-ssl-ee_depth_weak"
    with pytest.raises(ConfigError, match="variants"):
        cell_params(_raw(), _settings(), "nope", "ssl")


def _cell(root: Path, init: str, variant: str, tiers: list[int], depths: list[int | None],
          per_tier: dict[int, float], final: float) -> None:
    folder = cell_folder(root, init, variant)
    folder.mkdir(parents=True)
    metrics = {"plan": variant, "weighting": "uniform", "client_tiers": tiers, "client_depths": depths,
               "exit2_accuracy": 0.5, "exit4_accuracy": final, "final_exit_accuracy": final, "bytes_up_total": 1,
               **{f"tier{t}_gflops_per_round": v for t, v in per_tier.items()}}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_compute_is_averaged_over_every_client_and_compared_with_full(tmp_path: Path) -> None:
    tiers = [2, 2, 4, 4]
    _cell(tmp_path, "ssl", "full", tiers, [4, 4, 4, 4], {2: 4.0, 4: 4.0}, 0.90)
    _cell(tmp_path, "ssl", "early", tiers, [2, 2, 4, 4], {2: 2.0, 4: 4.0}, 0.89)
    _cell(tmp_path, "ssl", "drop_weak", tiers, [None, None, 4, 4], {4: 4.0}, 0.80)
    rows = {r["variant"]: r for r in collect(tmp_path)}
    assert rows["early"]["client_gflops"] == pytest.approx(3.0)        # (2+2+4+4)/4
    assert rows["drop_weak"]["client_gflops"] == pytest.approx(2.0)    # the weak clients spend nothing
    assert rows["early"]["compute_saved"] == pytest.approx(0.25)
    assert rows["early"]["accuracy_lost"] == pytest.approx(0.01)
    text = markdown_table(list(rows.values()))
    assert "| ssl | early | 0.500 | 0.890 | 3.000 | +25.0% | +1.0 pts |" in text
