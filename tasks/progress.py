"""Progress shown two ways: a tqdm bar in a terminal (a line now and then elsewhere) and a Prefect artifact."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from uuid import UUID

from tqdm.auto import tqdm

from tasks.orchestration import in_flow_run

LINE_INTERVAL_S = 10.0
"""Off a terminal, the least time between two progress lines (the last step always gets one)."""


class Progress:
    r"""A progress bar plus, inside a Prefect run, a progress artifact updated at most every ``min_interval_s``.

    When stderr is not a terminal (DVC's output captured, a Prefect worker, CI), there is no bar, whose redraws
    would become one long ``\r``-joined line; instead one line ``description: done/total (pct) elapsed, postfix``
    goes to stdout at most every ``line_interval_s`` and after the last step (every step with
    ``line_interval_s=0``). Inside a flow that logs prints, those lines are the run's log.

    Parameters
    ----------
    total : int
        Number of steps.
    description : str
        Label of the bar and of the artifact.
    key : str, optional
        Prefect artifact key (lowercase letters, digits and dashes).
    line_interval_s : float
        Off a terminal, the least seconds between two lines.
    """

    def __init__(self, total: int, description: str, key: str | None = None, min_interval_s: float = 2.0,
                 line_interval_s: float = LINE_INTERVAL_S) -> None:
        self.total = max(int(total), 1)
        self.done = 0
        self.description = description
        self._lines = not sys.stderr.isatty()
        self._line_interval_s, self._started = line_interval_s, time.monotonic()
        self._last_line: float | None = None
        self._bar = tqdm(total=total, desc=description, file=sys.stderr, dynamic_ncols=True, leave=True,
                         disable=self._lines)
        self._artifact_id: UUID | None = None
        self._last = 0.0
        self._min_interval_s = min_interval_s
        if key is not None and in_flow_run():
            from prefect.artifacts import create_progress_artifact

            self._artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)

    def update(self, steps: int = 1, postfix: dict[str, object] | None = None) -> None:
        """Advance by ``steps``; ``postfix`` is shown beside the bar (e.g. the latest accuracy)."""
        self.done += steps
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)  # shown by the update below, with this step
        self._bar.update(steps)
        now = time.monotonic()
        if self._lines and steps and (self.done >= self.total or self._last_line is None
                                      or now - self._last_line >= self._line_interval_s):
            self._last_line = now
            shown = "".join(f", {k}={_short(v)}" for k, v in (postfix or {}).items())
            print(f"{self.description}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%) "
                  f"{now - self._started:.1f} s{shown}", flush=True)
        if self._artifact_id is not None and (now - self._last >= self._min_interval_s or self.done >= self.total):
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact_id, progress=100.0 * self.done / self.total)
            self._last = now

    def close(self) -> None:
        """Close the bar (the artifact keeps its last value)."""
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
