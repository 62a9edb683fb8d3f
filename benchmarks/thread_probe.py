"""Where the one-client-at-a-time runner's extra time goes: the bare loop's rounds on three kinds of thread.

    python -m benchmarks.thread_probe main --rounds 6
    python -m benchmarks.thread_probe thread --rounds 6
    python -m benchmarks.thread_probe prefect --rounds 6

Each round trains the reference workload's ten clients one after the other on ``--threads`` (2) torch intra-op
threads, then aggregates and evaluates on the main thread (:func:`benchmarks.bare_loop.federate`). Only where
the clients run changes: on the main thread (``main``), on one plain ``ThreadPoolExecutor`` worker (``thread``),
or as Prefect task runs on a one-worker ``ThreadPoolTaskRunner`` (``prefect``). Prints the median seconds per
round and the last round's accuracy (the same in every mode: the arithmetic does not change). Needs
``results/reference/workload.npz`` (``python -m benchmarks.reference --prepare-only``).
"""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.bare_loop import Train, Workload, federate, load_workload, local_train

MODES = ("main", "thread", "prefect")


@dataclass(frozen=True)
class ProbeResult:
    """Seconds of each round, the last round's test accuracy and the final global state."""

    seconds: list[float]
    accuracy: float
    state: dict[str, torch.Tensor]


def _rounds(work: Workload, rounds: int, train: Train) -> ProbeResult:
    accuracies, seconds, state = federate(work, rounds, train)
    return ProbeResult(seconds, accuracies[-1], state)


def probe(work: Workload, rounds: int, mode: str) -> ProbeResult:
    """``rounds`` bare-loop rounds with the clients trained in ``mode``; timings, accuracy, final state."""
    if mode == "main":
        return _rounds(work, rounds, local_train)
    if mode == "thread":
        with ThreadPoolExecutor(max_workers=1) as pool:
            return _rounds(work, rounds, lambda *a: pool.submit(local_train, *a).result())
    if mode != "prefect":
        raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    train_task = task(local_train, name="local_train", cache_policy=None, persist_result=False)

    @flow(name="thread-probe", task_runner=ThreadPoolTaskRunner(max_workers=1), persist_result=False)
    def prefect_rounds() -> ProbeResult:
        return _rounds(work, rounds, lambda *a: train_task.submit(*a).result())

    return prefect_rounds()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--workload", type=Path, default=Path("results/reference/workload.npz"))
    args = parser.parse_args(argv)
    if not args.workload.exists():
        parser.error(f"{args.workload} not found: run 'python -m benchmarks.reference --prepare-only' first")
    torch.set_num_threads(args.threads)
    result = probe(load_workload(args.workload), args.rounds, args.mode)
    print(f"{args.mode}: median {statistics.median(result.seconds):.2f} s/round over {args.rounds} rounds, "
          f"last-round accuracy {result.accuracy:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
