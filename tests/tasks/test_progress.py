"""Progress off a terminal: periodic lines instead of a bar's redraws."""

from __future__ import annotations

import re
import sys

import pytest

from tasks.progress import Progress


def _lines(text: str) -> list[str]:
    return [re.sub(r" \d+\.\d s", " T s", line) for line in text.splitlines()]


def test_off_a_terminal_each_step_is_a_line_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress(3, "federate rounds", line_interval_s=0.0) as bar:
        for accuracy in (0.5, 0.625, 0.75):
            bar.update(1, {"acc": accuracy})
    captured = capsys.readouterr()
    assert _lines(captured.out) == ["federate rounds: 1/3 (33%) T s, acc=0.5", "federate rounds: 2/3 (67%) T s, "
                                    "acc=0.625", "federate rounds: 3/3 (100%) T s, acc=0.75"]
    assert "\r" not in captured.err  # no bar redraws


def test_off_a_terminal_lines_are_spaced_but_the_last_step_always_shows(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress(100, "features", line_interval_s=3600.0) as bar:
        for _ in range(100):
            bar.update(1)
    assert _lines(capsys.readouterr().out) == ["features: 1/100 (1%) T s", "features: 100/100 (100%) T s"]


def test_in_a_terminal_there_is_a_bar_and_no_lines(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with Progress(2, "rounds", line_interval_s=0.0) as bar:
        bar.update(2)
    captured = capsys.readouterr()
    assert captured.out == "" and "rounds: 100%" in captured.err
