"""The headline stage: a study's DVC metrics are a few numbers of its summaries, nested under the study's name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fedcore.errors import ConfigError
from flows.headline import headline, main
from tasks.studies import STUDIES

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def summaries(tmp_path: Path) -> Path:
    (tmp_path / "m").mkdir()
    (tmp_path / "m/federate.json").write_text(json.dumps(
        {"global_accuracy": 0.9, "best_round": 3, "malicious_clients": [], "detect_recall": None}))
    (tmp_path / "m/selection.json").write_text(json.dumps(
        {"tasks": {"digit": {"best_test": 0.8}, "speaker": {"best_test": 0.95}}}))
    return tmp_path


def test_picks_keys_paths_and_every_key_of_a_wildcard(summaries: Path) -> None:
    assert headline(["acc=m/federate.json:global_accuracy", "round=m/federate.json:best_round",
                     "*=m/selection.json:tasks.*.best_test", "recall=m/federate.json:detect_recall"],
                    summaries) == {"acc": 0.9, "round": 3, "digit": 0.8, "speaker": 0.95, "recall": None}
    assert headline(["test_*=m/selection.json:tasks.*.best_test"], summaries) == {"test_digit": 0.8,
                                                                                   "test_speaker": 0.95}


@pytest.mark.parametrize(("entry", "message"), [
    ("acc=m/federate.json:nokey", "has no key 'nokey'. Keys there: best_round"),
    ("acc=m/federate.json:malicious_clients", "is not a finite number. Got \\[\\]"),
    ("acc=m/missing.json:x", "'m/missing.json' not found"),
    ("acc-m/federate.json:x", "is not NAME=FILE:KEY"),
    ("acc=m/selection.json:tasks.*.best_test", "is not NAME=FILE:KEY"),
    ("*=m/selection.json:tasks.*.*", "more than one '\\*'"),
    ("acc=m/federate.json:global_accuracy.x", "has no object at global_accuracy"),
])
def test_bad_entries_name_the_problem(summaries: Path, entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        headline([entry], summaries)


def test_a_name_given_twice_is_refused(summaries: Path) -> None:
    with pytest.raises(ConfigError, match="'digit' is named twice"):
        headline(["digit=m/federate.json:best_round", "*=m/selection.json:tasks.*.best_test"], summaries)


def test_main_writes_the_values_under_the_study(summaries: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(summaries)
    assert main(["--study", "s", "--out", "out/headline.json", "acc=m/federate.json:global_accuracy"]) == 0
    assert json.loads((summaries / "out/headline.json").read_text()) == {"s": {"acc": 0.9}}
    assert main(["--study", "s", "--out", "out/other.json", "acc=m/federate.json:nokey"]) == 2
    assert not (summaries / "out/other.json").exists()


def test_every_study_declares_only_its_headline_as_dvc_metrics() -> None:
    """No two studies' metrics share a column: the one metrics file is the headline its last stage writes."""
    for name, study in STUDIES.items():
        stages = yaml.safe_load((REPO_ROOT / study.dvc_file).read_text())["stages"]
        declared = [next(iter(m)) if isinstance(m, dict) else m
                    for stage in stages.values() for m in stage.get("metrics", [])]
        assert declared == [study.metrics], (name, declared)
        writers = [stage for stage in stages.values() if any(m == study.metrics or study.metrics in m
                                                                for m in stage.get("metrics", []))]
        commands = " ".join(" ".join(writers[0]["cmd"]).split())
        assert f"python -m flows.headline --study {name} --out {study.metrics}" in commands, (name, commands)
