"""FASSL's model selection: per downstream task, the round with the best validation score (PAPERS.md §4).

For each task the round with the highest *validation* score wins (the earliest on ties; round 0, the random-init
floor, is never selected); the test score at the selected round is reported beside the last round's, never used to
choose. ``tasks.selection`` reads the scores from a finished MLflow run and registers the chosen rounds' models.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

FLOOR_ROUND = 0


@dataclass(frozen=True)
class TaskSelection:
    """The selected round of one task and the scores beside it (``None``: not logged)."""

    task: str
    metric: str
    best_round: int
    best_val: float
    best_test: float | None
    last_round: int
    last_val: float
    last_test: float | None
    floor_test: float | None
    model_id: str | None = None
    version: int | None = None
    alias: str | None = None
    reproduced_test: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON)."""
        return asdict(self)


def best_round(scores: Mapping[int, float]) -> int:
    """The round of the highest score, the earliest on ties; round 0 (the floor) is not a candidate.

    Raises
    ------
    ValueError
        If no round >= 1 was scored.
    """
    candidates = sorted((r, v) for r, v in scores.items() if r > FLOOR_ROUND)
    if not candidates:
        raise ValueError(f"select: no scored round >= 1. Got rounds {sorted(scores)}.")
    return max(candidates, key=lambda item: (item[1], -item[0]))[0]


def choose(task_name: str, metric: str, val: Mapping[int, float], test: Mapping[int, float]) -> TaskSelection:
    """The selection of one task from its per-round validation and test scores."""
    chosen = best_round(val)
    last = max(r for r in val if r > FLOOR_ROUND)
    return TaskSelection(task=task_name, metric=metric, best_round=chosen, best_val=val[chosen],
                         best_test=test.get(chosen), last_round=last, last_val=val[last], last_test=test.get(last),
                         floor_test=test.get(FLOOR_ROUND))


def task_names(metric_keys: Sequence[str], metric: str, declared: str | None = None) -> list[str]:
    """Tasks with a ``<task>/<metric>_val`` metric, sorted.

    ``declared`` is the run's ``downstream.tasks`` param (a logged list of task mappings): when given, only its
    tasks count; otherwise every prefix but the means (``mean``) and the run's final summary (``final_*``).
    """
    suffix = f"/{metric}_val"
    found = {k[: -len(suffix)] for k in metric_keys if k.endswith(suffix)}
    if declared:
        try:
            names = {str(spec["name"]) for spec in ast.literal_eval(declared)}
        except (ValueError, SyntaxError, TypeError, KeyError):
            names = None
        if names is not None:
            return sorted(found & names)
    return sorted(n for n in found if n != "mean" and not n.startswith("final_"))


