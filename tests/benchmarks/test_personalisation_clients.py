"""Per-client split of the personalisation matrix: benign vs poisoned means, change vs the same clients clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.personalisation.clients import attacked_clients, benign_change, split_clients


def test_benign_and_poisoned_means_are_apart_from_the_all_client_one() -> None:
    means = split_clients({0: 0.9, 1: 0.8, 2: 0.1, 3: 0.0}, [2, 3])
    assert means == {"personalised_accuracy_mean": pytest.approx(0.45), "benign_accuracy_mean": pytest.approx(0.85),
                     "poisoned_accuracy_mean": pytest.approx(0.05)}
    clean = split_clients({0: 0.9, 1: 0.8}, [])
    assert clean["benign_accuracy_mean"] == clean["personalised_accuracy_mean"]
    assert clean["poisoned_accuracy_mean"] is None


def test_benign_change_is_against_the_same_clients_clean() -> None:
    clean = {"accuracy": {"0": 0.9, "1": 0.8, "2": 0.7, "3": 0.6}, "attacked": []}
    flip = {"accuracy": {"0": 0.85, "1": 0.8, "2": 0.1, "3": 0.0}, "attacked": [2, 3]}
    # clients 0 and 1: (−0.05 + 0) / 2, not 0.825 − the clean run's 0.75
    assert benign_change(flip, clean) == pytest.approx(-0.025)
    assert benign_change({"accuracy": {"2": 0.1}, "attacked": [2]}, clean) is None


def test_the_poisoned_clients_are_the_poison_ground_truth_and_the_attacked_updates(tmp_path: Path) -> None:
    (tmp_path / "poison").mkdir()
    (tmp_path / "poison" / "ground_truth.json").write_text(json.dumps({"attacked_clients": [7, 2]}))
    assert attacked_clients(tmp_path, {"malicious_clients": [4, 2]}) == [2, 4, 7]
    assert attacked_clients(tmp_path / "none", {"malicious_clients": []}) == []
