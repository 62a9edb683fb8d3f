"""Per-client split of the personalisation benchmark: benign vs poisoned means, change vs clean, flag P/R."""

from __future__ import annotations

import pytest

from benchmarks.personalisation.clients import markdown, summarise


def _cell(accuracy: dict[int, float], attacked: list[int], flags: int = 0, on_attacked: int = 0) -> dict[str, object]:
    return {"accuracy": {str(c): a for c, a in accuracy.items()}, "attacked": attacked, "flags": flags,
            "flags_on_attacked": on_attacked, "rounds": 10}


def test_benign_change_is_against_the_same_clients_clean() -> None:
    cells = {"fsdd": {"fml": {
        "clean": _cell({0: 0.9, 1: 0.8, 2: 0.7, 3: 0.6}, []),
        "label_flip-0.2": _cell({0: 0.85, 1: 0.8, 2: 0.1, 3: 0.0}, [2, 3], flags=8, on_attacked=6),
    }}}
    row = summarise(cells)["fsdd"]["fml"]["label_flip-0.2"]
    assert row["benign_mean"] == pytest.approx(0.825) and row["poisoned_mean"] == pytest.approx(0.05)
    assert row["benign_clean_mean"] == pytest.approx(0.85)  # clients 0 and 1 only, not the clean run's 0.75
    assert row["flag_precision"] == pytest.approx(6 / 8) and row["flag_recall"] == pytest.approx(6 / 20)
    clean = summarise(cells)["fsdd"]["fml"]["clean"]
    assert clean["poisoned_mean"] is None and "flag_precision" not in clean


def test_markdown_places_cells_and_marks_missing_ones() -> None:
    cells = {"esc10": {"local": {"clean": _cell({0: 1.0, 1: 0.5}, []),
                                 "label_flip-0.4": _cell({0: 1.0, 1: 0.0}, [1])}}}
    text = markdown(summarise(cells), ["local", "fedavg"], ["clean", "label_flip-0.2", "label_flip-0.4"])
    row = next(line for line in text.splitlines() if line.startswith("| local"))
    assert row == "| local | not run | 1.000 (+0.000) / 0.000 |"  # no flags: no flag line
    assert "| fedavg" not in text  # a method with no cell for this dataset has no row
