"""FASSL's best-round selection: the pure functions of tasks/selection.py (no MLflow)."""

from __future__ import annotations

import pytest

from fedcore.evaluation.selection import TaskSelection, best_round, choose, task_names
from tasks.selection import selection_markdown


# ------------------------------------------------------------------------------------------------ best_round
def test_best_round_is_the_highest_score() -> None:
    assert best_round({1: 0.2, 2: 0.9, 3: 0.4}) == 2
    assert best_round({5: 0.1}) == 5


def test_best_round_takes_the_earliest_on_ties() -> None:
    assert best_round({4: 0.7, 1: 0.5, 2: 0.7, 3: 0.7}) == 2
    assert best_round({3: 0.0, 1: 0.0, 2: 0.0}) == 1


def test_best_round_never_chooses_round_zero() -> None:
    assert best_round({0: 0.99, 1: 0.1, 2: 0.3}) == 2
    assert best_round({0: 0.5, 1: 0.5}) == 1


@pytest.mark.parametrize("scores", [{0: 0.5}, {}])
def test_best_round_needs_a_scored_round(scores: dict[int, float]) -> None:
    with pytest.raises(ValueError, match="no scored round >= 1"):
        best_round(scores)


# ------------------------------------------------------------------------------------------------ choose
VAL = {0: 0.2, 1: 0.5, 2: 0.8, 3: 0.6}
TEST = {0: 0.1, 1: 0.4, 2: 0.7, 3: 0.65}


def test_choose_fills_best_last_and_floor() -> None:
    selection = choose("digit", "knn1", VAL, TEST)
    assert selection == TaskSelection(task="digit", metric="knn1", best_round=2, best_val=0.8, best_test=0.7,
                                      last_round=3, last_val=0.6, last_test=0.65, floor_test=0.1)
    assert (selection.model_id, selection.version, selection.alias, selection.reproduced_test) == (None,) * 4
    assert selection.as_dict()["best_round"] == 2


def test_choose_with_missing_test_scores() -> None:
    selection = choose("who", "knn20", VAL, {2: 0.3})
    assert (selection.best_round, selection.best_test) == (2, 0.3)
    assert (selection.last_test, selection.floor_test) == (None, None)
    nothing = choose("who", "knn20", {1: 0.4, 2: 0.4}, {})
    assert (nothing.best_round, nothing.last_round, nothing.best_test, nothing.last_test) == (1, 2, None, None)


def test_choose_last_round_may_be_the_best() -> None:
    selection = choose("t", "probe", {1: 0.1, 4: 0.9, 2: 0.3}, {1: 0.0, 2: 0.5, 4: 0.25})
    assert (selection.best_round, selection.last_round) == (4, 4)
    assert (selection.best_val, selection.last_val, selection.best_test, selection.last_test) == (0.9, 0.9, 0.25,
                                                                                                  0.25)


def test_choose_without_a_scored_round() -> None:
    with pytest.raises(ValueError, match="no scored round"):
        choose("t", "knn1", {0: 0.4}, {0: 0.3})


# ------------------------------------------------------------------------------------------------ task_names
KEYS = ["digit/knn1_val", "digit/knn1_test", "who/knn1_val", "who/knn1_test", "mean/knn1_val", "mean/knn1_test",
        "final_digit/knn1_val", "only_test/knn1_test", "other/knn5_val", "train_loss_mean", "digit/knn10_val",
        "esc-10/knn1_val"]


def test_task_names_without_declared_tasks() -> None:
    assert task_names(KEYS, "knn1") == ["digit", "esc-10", "who"]
    assert task_names(KEYS, "knn5") == ["other"]
    assert task_names(KEYS, "knn10") == ["digit"]
    assert task_names(KEYS, "probe") == []


def test_task_names_with_declared_tasks_as_mlflow_logs_them() -> None:
    declared = str([{"name": "who", "dataset": "fsdd", "label": "speaker", "split": "test"},
                    {"name": "missing", "dataset": "esc10", "label": "label", "split": "test"}])
    assert task_names(KEYS, "knn1", declared) == ["who"]  # only declared tasks, and only those scored
    # declared tasks may carry any prefix, even one the fallback would drop
    assert task_names(KEYS, "knn1", str([{"name": "final_digit"}, {"name": "digit"}])) == ["digit", "final_digit"]
    assert task_names(KEYS, "knn1", "[]") == []


@pytest.mark.parametrize("declared", [None, "", "not a list", "['digit', 'who']", "[{'dataset': 'fsdd'}]", "{"])
def test_task_names_fall_back_when_the_declaration_is_unusable(declared: str | None) -> None:
    assert task_names(KEYS, "knn1", declared) == ["digit", "esc-10", "who"]


# ------------------------------------------------------------------------------------------------ markdown
def test_selection_markdown_has_a_row_per_task() -> None:
    selections = [choose("digit", "knn1", VAL, TEST),
                  TaskSelection(task="who", metric="knn1", best_round=1, best_val=0.123456, best_test=None,
                                last_round=5, last_val=0.5, last_test=0.25, floor_test=None, version=4)]
    text = selection_markdown(selections, "run123", "fedaudio-encoder")
    lines = text.splitlines()
    assert text.endswith("\n")
    assert "run `run123`" in lines[0] and "`fedaudio-encoder@<task>`" in lines[0]
    assert "validation knn1" in lines[0]
    assert lines[2].startswith("| task | best round | val | test | last round |")
    assert lines[3] == "|---|---|---|---|---|---|---|---|---|"
    assert lines[4] == "| digit | 2 | 0.8000 | 0.7000 | 3 | 0.6000 | 0.6500 | 0.1000 | — |"
    assert lines[5] == "| who | 1 | 0.1235 | — | 5 | 0.5000 | 0.2500 | — | 4 |"
    assert len(lines) == 6


def test_selection_markdown_names_the_metric_and_handles_no_task() -> None:
    probe = [choose("digit", "probe", VAL, TEST)]
    assert "validation probe" in selection_markdown(probe, "r", "m").splitlines()[0]
    empty = selection_markdown([], "r", "m").splitlines()
    assert len(empty) == 4 and "validation knn1" in empty[0]
