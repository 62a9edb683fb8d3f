"""ModalityMirror benchmark settings and table: override layering, equal round budgets, the rate pivot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks.benchlib import read_matrix_params
from benchmarks.modality.driver import ANY_RATE, cell_folder, cell_params, collect, markdown_table, settings_of
from fedcore.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "benchmarks/modality/params.yaml"


def _settings() -> dict[str, object]:
    return settings_of(yaml.safe_load(PARAMS.read_text()))


def _raw() -> dict[str, object]:
    return read_matrix_params(PARAMS, "avbench")[0]


def test_cell_layers_method_and_rate_over_common_with_its_own_registry_names() -> None:
    params = cell_params(_raw(), _settings(), "modality_mirror", 0.5)
    assert params.modality.method == "modality_mirror" and params.modality.missing_rate == 0.5
    assert params.modality.registered_model == "av-modality_mirror-0.5"
    assert params.distill.teacher == "models:/av-modality_mirror-0.5@final"
    assert params.distill.student == "models:/av-modality_mirror-0.5-audio@final"
    assert params.mlflow.experiment == "fedaudio-modality"


def test_every_method_gets_the_same_total_rounds() -> None:
    settings = _settings()
    totals = {}
    for method in [*settings["method_names"], *settings["rate_free"]]:  # type: ignore[misc]
        params = cell_params(_raw(), settings, method, 0.3)
        totals[method] = params.federation.rounds + (params.distill.rounds if method == "modality_mirror" else 0)
    assert len(set(totals.values())) == 1, totals


def test_unknown_methods_and_bad_rates_fail_before_any_work() -> None:
    with pytest.raises(ConfigError, match="methods"):
        settings_of({"avbench": {"method_names": ["nope"], "methods": {}}})
    with pytest.raises(ConfigError, match="rates"):
        settings_of({"avbench": {"rates": [1.5], "methods": {}}})
    with pytest.raises(ConfigError, match="must be one of"):
        cell_params(_raw(), _settings(), "nope", 0.1)


def _cell(root: Path, method: str, rate: float | None, audio: float, av: float | None,
          student: float | None = None) -> None:
    folder = cell_folder(root, method, rate)
    folder.mkdir(parents=True)
    metrics = {"audio_accuracy": audio, "audio_branch_accuracy": audio, "rounds": 20, "video_clients": [0, 1]}
    if av is not None:
        metrics["av_accuracy"] = av
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if student is not None:
        (folder / "distill.json").write_text(json.dumps({"audio_accuracy": student, "rounds": 10}))


def test_the_table_reports_the_student_for_modality_mirror_and_spreads_rate_free_cells(tmp_path: Path) -> None:
    _cell(tmp_path, "unifl", None, 0.80, None)
    _cell(tmp_path, "modality_mirror", 0.1, 0.50, 0.95, student=0.85)
    _cell(tmp_path, "modality_mirror", 0.5, 0.60, 0.90, student=0.82)
    rows = collect(tmp_path)
    mirror = [r for r in rows if r["method"] == "modality_mirror"]
    assert [r["audio"] for r in mirror] == [0.85, 0.82] and [r["rounds"] for r in mirror] == [30, 30]
    assert [r["audio"] for r in rows if r["method"] == "modality_mirror (phase 1 only)"] == [0.50, 0.60]
    text = markdown_table(rows)
    assert "| method | 0.1 | 0.5 |" in text
    assert "| unifl | 0.800 | 0.800 |" in text  # the rate-free cell stands for every rate
    assert "| modality_mirror | 0.850 | 0.820 |" in text
    assert "| modality_mirror | 0.950 | 0.900 |" in text  # audio-visual accuracy of the teacher
    assert cell_folder(tmp_path, "unifl", None).name == ANY_RATE
