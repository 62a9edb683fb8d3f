"""ModalityMirror benchmark: override layering, cells × seeds, equal audio-training budgets, the table and claims."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.benchlib import read_matrix_params
from benchmarks.modality.driver import (
    ANY_RATE,
    PHASE1,
    Cell,
    audio_encoder_steps,
    budget_problems,
    budget_table,
    cell_folder,
    cell_params,
    check_budgets,
    claims,
    collect,
    markdown_table,
    planned_cells,
    settings_of,
)
from fedcore.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "benchmarks/modality"
PARAMS = FOLDER / "params.yaml"
T_0975_2 = 4.302653  # Student's t quantile t_{0.975, 2} (3 seeds)


def _settings() -> dict[str, Any]:
    return settings_of(yaml.safe_load(PARAMS.read_text()))


def _raw() -> dict[str, Any]:
    return read_matrix_params(PARAMS, "avbench")[0]


def test_cell_layers_method_rate_and_seed_over_common_with_its_own_registry_names() -> None:
    params = cell_params(_raw(), _settings(), "modality_mirror", 0.5, seed=2)
    assert params.modality.method == "modality_mirror" and params.modality.missing_rate == 0.5
    assert (params.partition.seed, params.federation.seed, params.modality.seed) == (2, 2, 2)
    assert params.modality.pair_seed == 0  # the pairing is the dataset: not a seed axis
    assert params.modality.registered_model == "av-modality_mirror-0.5-seed2"
    assert params.distill.teacher == "models:/av-modality_mirror-0.5-seed2@final"
    assert params.distill.student == "models:/av-modality_mirror-0.5-seed2-audio@final"
    assert params.mlflow.experiment == "fedaudio-modality"


def test_the_matrix_expands_claim_cells_over_every_seed_and_context_cells_over_theirs() -> None:
    settings = _settings()
    seeds, rates = settings["seeds"], settings["rates"]
    assert len(seeds) >= 3 and rates == [0.1, 0.3, 0.5, 0.7]
    cells = planned_cells(settings)
    for method in ("modality_mirror", "harmony"):
        assert {(c.rate, c.seed) for c in cells if c.method == method} == {(r, s) for r in rates for s in seeds}
    assert {(c.rate, c.seed) for c in cells if c.method == "unifl"} == {(None, s) for s in seeds}
    assert {(c.rate, c.seed) for c in cells if c.method == "multifl"} == {
        (r, s) for r in rates for s in settings["context_seeds"]}
    assert len(cells) == len(set(cells)) == 9 * len(seeds) + 4 * len(settings["context_seeds"])


def test_dvc_yaml_runs_exactly_the_planned_cells_and_a_distill_per_mirror_cell() -> None:
    from dvc.repo import Repo

    settings = _settings()
    with Repo(str(FOLDER)) as repo:
        metrics = {Path(o.fs_path).resolve().relative_to(FOLDER).as_posix()
                   for stage in repo.index.stages for o in stage.outs if o.metric}
    planned = {(cell_folder(Path("results"), c.method, c.rate, c.seed) / "metrics.json").as_posix()
               for c in planned_cells(settings)}
    distilled = {(cell_folder(Path("results"), c.method, c.rate, c.seed) / "distill.json").as_posix()
                 for c in planned_cells(settings) if c.method == "modality_mirror"}
    assert metrics == planned | distilled


def test_audio_encoder_steps_by_hand() -> None:
    raw, settings = _raw(), _settings()
    # E = 1, B = 32: a client with 100 rows takes ⌈100/32⌉ = 4 steps per round.
    unifl = cell_params(raw, settings, "unifl", None)
    mirror = cell_params(raw, settings, "modality_mirror", 0.3)
    harmony = cell_params(raw, settings, "harmony", 0.3)
    assert audio_encoder_steps(unifl, 100, True, False) == 30 * 4
    assert audio_encoder_steps(mirror, 100, True, True) == (20 + 10) * 4     # phase 1 + distillation
    assert audio_encoder_steps(mirror, 100, False, True) == 20 * 4           # no images: no distillation
    assert audio_encoder_steps(harmony, 100, False, False) == (40 - 10) * 4  # fusion rounds freeze the encoders
    assert audio_encoder_steps(harmony, 1, True, False) == 30


def test_the_matrix_gives_every_method_the_same_audio_training_budget() -> None:
    raw, settings = _raw(), _settings()
    check_budgets(raw, settings)
    table = budget_table(raw, settings)
    assert set(table) == {"unifl", "multifl", "harmony", "modality_mirror"}
    for method, steps in table.items():
        assert steps[True] == table["unifl"][True], method  # clients with video: exactly equal
        assert all(s <= r for s, r in zip(steps[False].values(), table["unifl"][False].values(), strict=True))


@pytest.mark.parametrize(("method", "override", "fragment"), [
    ("harmony", {"federation.rounds": 30}, "harmony gives a client with video"),        # the old 20 + 10
    ("modality_mirror", {"distill.rounds": 20}, "modality_mirror gives a client with video"),
    ("unifl", {"federation.batch_size": 16}, "gives a client with video"),                # B differs
])
def test_an_unequal_budget_fails_before_any_work(method: str, override: dict[str, Any], fragment: str) -> None:
    raw, settings = _raw(), _settings()
    settings["methods"] = {**settings["methods"], method: {**settings["methods"][method], **override}}
    problems = budget_problems(budget_table(raw, settings, sizes=(1, 40, 100)))
    assert problems and any(fragment in p for p in problems), problems
    with pytest.raises(ConfigError, match="audio-encoder steps"):
        check_budgets(raw, settings)


def test_the_distill_overrides_count_in_the_budget() -> None:
    raw, settings = _raw(), _settings()
    settings["distill"] = {**settings["distill"], "distill.rounds": 15}  # what the distill command applies
    with pytest.raises(ConfigError, match="modality_mirror gives a client with video"):
        check_budgets(raw, settings)


def test_unknown_methods_bad_rates_seeds_and_claims_fail_before_any_work() -> None:
    with pytest.raises(ConfigError, match="methods"):
        settings_of({"avbench": {"method_names": ["nope"], "methods": {}}})
    with pytest.raises(ConfigError, match="rates"):
        settings_of({"avbench": {"rates": [1.5], "seeds": [0, 1], "context_seeds": [0], "methods": {}}})
    with pytest.raises(ConfigError, match="seeds"):
        settings_of({"avbench": {"rates": [0.1], "seeds": [0], "context_seeds": [0], "methods": {}}})
    bad_claim = {**_settings(), "claims": [{"claim": "x", "a": "multifl", "b": "unifl", "metric": "audio"}]}
    with pytest.raises(ConfigError, match="claim cells"):
        settings_of({"avbench": bad_claim})
    with pytest.raises(ConfigError, match="must be one of"):
        cell_params(_raw(), _settings(), "nope", 0.1)


def _cell(root: Path, method: str, rate: float | None, seed: int, audio: float, av: float | None = None,
          student: float | None = None) -> None:
    folder = cell_folder(root, method, rate, seed)
    folder.mkdir(parents=True)
    metrics = {"audio_accuracy": audio, "audio_branch_accuracy": audio, "rounds": 20, "video_clients": [0, 1]}
    if av is not None:
        metrics["av_accuracy"] = av
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if student is not None:
        (folder / "distill.json").write_text(json.dumps({"audio_accuracy": student, "rounds": 10}))


def _small_settings() -> dict[str, Any]:
    return {**_settings(), "rates": [0.1], "seeds": [0, 1, 2], "context_names": [], "context_seeds": [0]}


def test_a_claim_gives_the_paired_interval_and_verdict_of_hand_made_seeds(tmp_path: Path) -> None:
    settings = _small_settings()
    students, unifl, harmony = [0.80, 0.82, 0.84], [0.70, 0.71, 0.75], [0.83, 0.80, 0.86]
    for seed in range(3):
        _cell(tmp_path, "modality_mirror", 0.1, seed, 0.5, av=0.9, student=students[seed])
        _cell(tmp_path, "unifl", None, seed, unifl[seed])
        _cell(tmp_path, "harmony", 0.1, seed, harmony[seed], av=0.95)
    rows, missing = collect(tmp_path, settings)
    assert not missing
    by = {(c["b"], c["rate"]): c for c in claims(rows, settings)}
    # vs UniFL: d = [0.10, 0.11, 0.09]: mean 0.10, sd 0.01; half-width t·0.01/√3 = 0.0248 → [0.075, 0.125]: holds.
    mean, half = 0.10, T_0975_2 * 0.01 / math.sqrt(3)
    c = by[("unifl", "0.1")]
    assert c["n"] == 3 and c["mean_diff"] == pytest.approx(mean)
    assert (c["low"], c["high"]) == pytest.approx((mean - half, mean + half), abs=1e-6)
    assert c["verdict"] == "holds" and c["note"] == ""
    # vs Harmony: d = [-0.03, 0.02, -0.02]: mean -0.01, sd 0.0265; interval spans 0: unresolved, needs 5 seeds.
    c = by[("harmony", "0.1")]
    sd = math.sqrt(((-0.02) ** 2 + 0.03**2 + (-0.01) ** 2) / 2)
    assert c["mean_diff"] == pytest.approx(-0.01)
    assert c["high"] - c["mean_diff"] == pytest.approx(T_0975_2 * sd / math.sqrt(3), abs=1e-6)
    assert c["verdict"] == "unresolved" and c["note"] == "needs 5 seeds (has 3)"
    text = markdown_table(rows, settings, claims(rows, settings))
    assert "| modality_mirror | 0.820 ± 0.020 (n=3) |" in text                     # the distilled student
    assert f"| {PHASE1} | 0.500 ± 0.000 (n=3) |" in text
    assert "| unifl | 0.720 ± 0.026 (n=3) |" in text                              # rate-free: every rate
    assert "beats UniFL on audio under missing video: **holds** (1 parts)" in text
    assert "beats Harmony on audio under missing video: **unresolved** (1 parts)" in text


def test_a_claim_below_its_margin_does_not_hold(tmp_path: Path) -> None:
    settings = _small_settings()
    for seed, (student, uni) in enumerate([(0.60, 0.70), (0.61, 0.72), (0.59, 0.73)]):
        _cell(tmp_path, "modality_mirror", 0.1, seed, 0.5, av=0.9, student=student)
        _cell(tmp_path, "unifl", None, seed, uni)
    rows, _ = collect(tmp_path, settings)
    c = next(c for c in claims(rows, settings) if c["b"] == "unifl")
    assert c["high"] < 0 and c["verdict"] == "does not hold"


def test_the_table_reads_only_the_cells_of_the_current_matrix(tmp_path: Path) -> None:
    settings = _small_settings()
    _cell(tmp_path, "unifl", None, 0, 0.70)
    _cell(tmp_path, "unifl", None, 7, 0.10)                    # a seed no longer in the matrix
    _cell(tmp_path, "harmony", 0.9, 0, 0.10)                   # a rate no longer in the matrix
    _cell(tmp_path, "multifl", 0.1, 0, 0.10)                   # a method no longer in the matrix
    old = tmp_path / "cells" / "unifl" / ANY_RATE / "metrics.json"  # the layout before seeds
    old.write_text(json.dumps({"audio_accuracy": 0.0, "rounds": 30}))
    _cell(tmp_path, "modality_mirror", 0.1, 0, 0.5, av=0.9)    # phase 1 finished, distillation not yet
    rows, missing = collect(tmp_path, settings)
    assert sorted((r["method"], r["rate"], r["seed"]) for r in rows) == [(PHASE1, "0.1", 0), ("unifl", ANY_RATE, 0)]
    assert str(cell_folder(tmp_path, "modality_mirror", 0.1, 0) / "distill.json") in missing
    assert str(cell_folder(tmp_path, "harmony", 0.1, 2)) in missing
    assert len(missing) == len(planned_cells(settings)) - 2 + 1
    assert Cell("unifl", None, 7) not in planned_cells(settings)
    text = markdown_table(rows, settings, claims(rows, settings), missing)
    assert "| unifl | 0.700 (1 seed) |" in text and "0.100" not in text
    assert "Not finished" in text
