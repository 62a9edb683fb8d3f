"""Run a command in a child process and measure it: wall seconds and the peak RSS of it and of its whole tree."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Measured:
    """Outcome of :func:`run_measured`."""

    returncode: int
    seconds: float
    peak_rss_mib: float
    peak_rss_tree_mib: float
    stderr: str


def _sample_rss(process: psutil.Popen, peaks: dict[str, float], stop: threading.Event) -> None:
    """Track the peak RSS of ``process`` alone and of its whole tree (children, grandchildren), in bytes."""
    while not stop.is_set():
        try:
            own = process.memory_info().rss
            tree = own
            for child in process.children(recursive=True):
                try:
                    tree += child.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            own = tree = 0
        peaks["own"] = max(peaks["own"], own)
        peaks["tree"] = max(peaks["tree"], tree)
        stop.wait(0.05)


def run_measured(command: Sequence[str], env: Mapping[str, str] | None = None, show: bool = False) -> Measured:
    """Run ``command``; sample its resident memory every 50 ms. ``show``: let its stdout through."""
    peaks = {"own": 0.0, "tree": 0.0}
    stop = threading.Event()
    started = time.perf_counter()
    process = psutil.Popen(list(command), stdout=None if show else subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, env=None if env is None else dict(env))
    sampler = threading.Thread(target=_sample_rss, args=(process, peaks, stop), daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    stop.set()
    sampler.join()
    return Measured(process.returncode, time.perf_counter() - started, peaks["own"] / 2**20,
                    peaks["tree"] / 2**20, stderr)
