"""The reference workload (shared/BENCHMARKS.md), side by side: this project, Flower's simulation engine, a bare loop.

    make bench-reference                              # = python -m benchmarks.reference
    python -m benchmarks.reference --rounds 5 --skip flower --repeat 1
    python -m benchmarks.reference --variants threads,threads:1,ray
    python -m benchmarks.reference --report-only      # the table again from the saved JSON

Prepares the workload once, outside every timed part, with this project's own stages and the named config
``benchmarks/reference/params.yaml`` (FSDD, log-mel, Dirichlet α=0.5 over 10 clients, cnn4, FedAvg 30 rounds,
1 local epoch): download (mirror first), features, partition. It checks that the partition stage drew exactly the
partition BENCHMARKS.md words (:func:`benchmarks.bare_loop.spec_partition`), then writes ``workload.npz`` (the
normalised features and the clients' rows) for the two programs outside the project.

Then, in one command and one after the other, each in a child process whose resident memory is sampled every 50 ms
(the process and all its children: Prefect's temporary server, Ray's workers):

- ``bare``: :mod:`benchmarks.bare_loop`, plain PyTorch, clients one after the other, on all cores (the yardstick
  of the ratios) and on one thread (the arithmetic of a client that trains beside others on one core each, as
  this project's and Flower's clients do: their per-round accuracy can then be compared exactly);
- ``fedaudio`` variants (``--variants``, ``runner[:workers]``): the project's federate flow (``python -m
  flows.federate``) with every round's Prefect task runs, MLflow logging of metrics and model, checkpoint and test
  evaluation; ``threads`` (clients in parallel up to the cores), ``threads:1`` (one at a time, which isolates
  the orchestration's cost), ``dask``, ``ray``;
- ``flower``: :mod:`benchmarks.flower_app`, Flower's simulation engine (Ray backend) in its own environment
  ``.venv-flower`` (``make flower-venv``; its pins conflict with Prefect's), skipped with a note when absent.

"30 rounds" is the time of the rounds alone (every framework's start-up excluded: Prefect's server, Ray's
cluster); "end to end" is the child process from start to exit. Prints the table, with each row's ratio to the
bare loop, and writes ``results/reference/summary.{json,md,png}``. Every system runs ``--repeat`` times (default 3),
interleaved so that a slow spell of a shared machine hits all alike; the table gives each figure's median (every
run's figures are in the JSON), and the verdicts add the project's peak memory against Flower's (budget 0.5x) and
its orchestration overhead (``threads:1``, the same arithmetic one client at a time, minus the bare loop).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

from benchmarks.bare_loop import save_workload, spec_partition
from benchmarks.procs import run_measured
from tasks.rounds import read_run_record

PARAMS = Path("benchmarks/reference/params.yaml")
FLOWER_PYTHON = Path(".venv-flower/bin/python")
LAST = 5  # rounds in the "last rounds" mean accuracy: steadier than the final round's on this workload
BUDGET = 1.10  # issue 8: the project's rounds may take at most 1.10x the bare loop's
ACCURACY_TOLERANCE = 0.01  # and match Flower's accuracy within one point
MEMORY_BUDGET = 0.5  # issue 22: the project's process tree at most half of Flower's peak memory
REPEAT = 3  # runs of each system, interleaved; the table gives their medians
MEDIAN_FIELDS = ("total_seconds", "median_round_seconds", "end_to_end_seconds", "peak_rss_mib", "peak_rss_tree_mib")


def prepare(params_file: Path, work: Path, raw: Path) -> Path:
    """Ingest, featurise and partition with the project's stages; check the partition; write the workload file."""
    from flows.download import download
    from flows.partition import partition
    from flows.poison import poison
    from tasks.common import read_json, read_params
    from tasks.data import featurise

    params = read_params(params_file)
    if not (raw / "manifest.csv").exists():
        raw = work / "raw"
        if not (raw / "manifest.csv").exists():
            download(params.download, raw, Path("data/downloads"))
    if not (work / "features" / "meta.json").exists():
        featurise.fn(params.features, raw, work / "features")
    partition(params.partition, work / "features", work / "partition")
    poison(params.poison, params.features, raw, work / "features", work / "partition/partition.json",
           work / "poison")

    from fedcore.data.features import FeatureStore

    store = FeatureStore.load(work / "features", mmap=True)
    split = read_json(work / "partition/partition.json")
    pool = np.sort(np.concatenate([np.asarray(c["train"], dtype=np.int64) for c in split["clients"]]))
    test = np.asarray(split["test"], dtype=np.int64)
    labels = np.asarray(store.labels, dtype=np.int64)
    parts = [np.searchsorted(pool, np.asarray(c["train"], dtype=np.int64)) for c in split["clients"]]
    cfg = params.partition
    expected = spec_partition(labels[pool], cfg.alpha, cfg.num_clients, cfg.seed, cfg.min_samples)
    if len(expected) != len(parts) or any(not np.array_equal(a, b) for a, b in zip(expected, parts, strict=False)):
        raise SystemExit("reference: the partition stage did not draw BENCHMARKS.md's partition; see "
                         "fedcore/data/partition.py (dirichlet) against benchmarks/bare_loop.spec_partition.")
    path = work / "workload.npz"
    save_workload(path, store.normalised(pool), labels[pool], store.normalised(test), labels[test], parts)
    print(f"reference: workload ready: {len(pool)} train clips over {len(parts)} clients "
          f"(sizes {[len(p) for p in parts]}), {len(test)} test clips; partition identical to BENCHMARKS.md's draw",
          flush=True)
    return path


def _quiet_env() -> dict[str, str]:
    from flows.stage import QUIET_ENV

    return {**os.environ, **QUIET_ENV, "PREFECT_LOGGING_LEVEL": "WARNING"}


def _failed(name: str, returncode: int, stderr: str) -> SystemExit:
    return SystemExit(f"reference: {name} failed (exit {returncode}):\n{stderr[-3000:]}")


def run_bare(workload: Path, work: Path, rounds: int, threads: int) -> dict[str, Any]:
    """The bare PyTorch loop in a child process, on ``threads`` torch threads."""
    out = work / f"bare-{threads}.json"
    run = run_measured([sys.executable, "-m", "benchmarks.bare_loop", "--workload", str(workload), "--out", str(out),
                        "--rounds", str(rounds), "--threads", str(threads)], env=_quiet_env())
    if run.returncode:
        raise _failed("the bare loop", run.returncode, run.stderr)
    result = json.loads(out.read_text())
    result["framework"] = f"torch {result['torch']}, {threads} thread{'s' if threads > 1 else ''}"
    return _row(result, run)


def run_flower(workload: Path, work: Path, rounds: int) -> dict[str, Any] | None:
    """Flower's simulation engine in its own environment; None when ``.venv-flower`` is missing."""
    if not FLOWER_PYTHON.exists():
        print(f"reference: {FLOWER_PYTHON} not found, Flower skipped (make flower-venv)", flush=True)
        return None
    out = work / "flower.json"
    run = run_measured([str(FLOWER_PYTHON), "-m", "benchmarks.flower_app", "--workload", str(workload),
                        "--out", str(out), "--rounds", str(rounds)], env=_quiet_env())
    if run.returncode:
        raise _failed("Flower", run.returncode, run.stderr)
    return _row(json.loads(out.read_text()), run)


def run_fedaudio(params_file: Path, work: Path, variant: str, rounds: int) -> dict[str, Any]:
    """The project's federate flow in a child process, with ``execution.runner[:max_workers]`` from ``variant``."""
    runner, _, workers = variant.partition(":")
    raw = yaml.safe_load(params_file.read_text())
    raw.setdefault("execution", {}).update(runner=runner, max_workers=int(workers) if workers else None)
    raw["federation"].update(rounds=rounds)
    name = variant.replace(":", "-")
    folder = work / f"fedaudio-{name}"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run, never a resumed one
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    # Its own Prefect home: the stage starts the shared server's keeper itself (never one left by other work), so
    # the keeper and Prefect's server are its children and count in its memory; idle 0 s: both exit with it.
    env = {**_quiet_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
           "PREFECT_HOME": str(folder / "prefect-home"), "FEDAUDIO_SERVER_IDLE_S": "0", "FEDAUDIO_SHARED_SERVER": "1"}
    env.pop("PREFECT_API_URL", None)
    run = run_measured([sys.executable, "-m", "flows.federate", "--params", str(folder / "params.yaml"),
                        "--features", str(work / "features"), "--partition", str(work / "partition/partition.json"),
                        "--poison", str(work / "poison"), "--checkpoints", str(folder / "ckpt"),
                        "--model", str(folder / "model.safetensors"), "--metrics", str(folder / "metrics.json"),
                        "--plots", str(folder / "plots")], env=env)
    if run.returncode:
        raise _failed(f"the federate flow ({variant})", run.returncode, run.stderr)
    record = read_run_record(folder / "metrics.json")  # timings live in the run record, not the DVC outputs
    with (folder / "plots/rounds.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    import torch

    result = {"accuracy": [float(r["global_accuracy"]) for r in rows],
              "round_seconds": [float(r.get("round_wall_seconds", r["round_seconds"]))
                                for r in record["round_timings"]],
              "total_seconds": record["seconds_total"],
              "framework": f"prefect {version('prefect')}, mlflow {version('mlflow')}",
              "torch": torch.__version__}
    return _row(result, run)


def _row(result: dict[str, Any], run: Any) -> dict[str, Any]:
    accuracy = result["accuracy"]
    return {**result, "final_accuracy": accuracy[-1], "best_accuracy": max(accuracy),
            "best_round": int(np.argmax(accuracy)) + 1, "last5_accuracy": float(np.mean(accuracy[-LAST:])),
            "median_round_seconds": float(np.median(result["round_seconds"])),
            "end_to_end_seconds": run.seconds, "peak_rss_mib": run.peak_rss_mib,
            "peak_rss_tree_mib": run.peak_rss_tree_mib}


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs of a system: the median of each time and memory figure (:data:`MEDIAN_FIELDS`).

    The accuracies and per-round figures are those of the run whose rounds took the median time; ``runs`` keeps
    every run's figures, and ``same_accuracy_every_run`` says whether the runs agreed round by round (the bare loop
    and the project do; Flower sums replies in arrival order).
    """
    order = sorted(range(len(runs)), key=lambda i: runs[i]["total_seconds"])
    row = dict(runs[order[len(order) // 2]])
    for key in MEDIAN_FIELDS:
        row[key] = float(np.median([run[key] for run in runs]))
    row["runs"] = [{key: run[key] for key in (*MEDIAN_FIELDS, "final_accuracy", "best_accuracy")} for run in runs]
    row["same_accuracy_every_run"] = all(run["accuracy"] == runs[0]["accuracy"] for run in runs)
    return row


def plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    """Test accuracy by round, and by elapsed seconds of the rounds, one line per framework."""
    from tasks.common import pyplot, save_figure

    plt = pyplot()
    fig, (by_round, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in rows.items():
        rounds = np.arange(1, len(row["accuracy"]) + 1)
        by_round.plot(rounds, row["accuracy"], label=name)
        by_time.plot(np.cumsum(row["round_seconds"]), row["accuracy"], label=name)
    by_round.set(xlabel="round", ylabel="test accuracy", title="accuracy by round")
    by_time.set(xlabel="seconds of training rounds", ylabel="test accuracy", title="accuracy by time")
    for axes in (by_round, by_time):
        axes.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=PARAMS)
    parser.add_argument("--rounds", type=int, default=None, help="override federation.rounds (default: params)")
    parser.add_argument("--variants", default="threads,threads:1",
                        help="fedaudio runs, comma-separated runner[:max_workers] (default threads,threads:1)")
    parser.add_argument("--skip", default="", help="comma-separated: bare, fedaudio, flower")
    parser.add_argument("--repeat", type=int, default=REPEAT,
                        help=f"runs of each system, interleaved; medians are reported (default {REPEAT})")
    parser.add_argument("--raw", type=Path, default=Path("data/raw"), help="ingested dataset to reuse if present")
    parser.add_argument("--work", type=Path, default=Path("results/reference"), help="features, runs, MLflow db")
    parser.add_argument("--out", type=Path, default=Path("results/reference/summary.json"))
    parser.add_argument("--prepare-only", action="store_true", help="prepare the workload file and stop")
    parser.add_argument("--report-only", action="store_true", help="print the table again from --out's JSON")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1. Got {args.repeat}.")
    if args.report_only:
        saved = json.loads(args.out.read_text())
        report(saved["runs"], saved["rounds"], args.out)
        return 0
    for key, value in _quiet_env().items():
        os.environ.setdefault(key, value)
    from tasks.common import read_params

    params = read_params(args.params)
    if params.download.dataset != "fsdd" and args.raw == Path("data/raw"):
        args.raw = args.work / "raw"
    if args.prepare_only:
        prepare(args.params, args.work, args.raw)
        return 0
    rounds = args.rounds or params.federation.rounds
    skip = {s for s in args.skip.split(",") if s}
    # In a child process, so that its Prefect server has exited before anything is timed.
    ready = run_measured([sys.executable, "-m", "benchmarks.reference", "--prepare-only", "--params",
                          str(args.params), "--raw", str(args.raw), "--work", str(args.work)], show=True)
    if ready.returncode:
        raise _failed("preparing the workload", ready.returncode, ready.stderr)
    workload = args.work / "workload.npz"
    runs: dict[str, list[dict[str, Any]]] = {}
    for attempt in range(1, args.repeat + 1):  # interleaved: a slow spell of the machine hits every system alike
        tag = f" (run {attempt} of {args.repeat})" if args.repeat > 1 else ""
        if "bare" not in skip:
            cores = os.cpu_count() or 1
            for threads in sorted({cores, 1}, reverse=True):
                print(f"reference: bare PyTorch loop, {threads} thread(s){tag} ...", flush=True)
                runs.setdefault("bare loop" if threads == cores else f"bare loop, {threads} thread", []).append(
                    run_bare(workload, args.work, rounds, threads))
        if "fedaudio" not in skip:
            for variant in args.variants.split(","):
                print(f"reference: fedaudio ({variant}){tag} ...", flush=True)
                runs.setdefault(f"fedaudio {variant}", []).append(run_fedaudio(args.params, args.work, variant,
                                                                               rounds))
        if "flower" not in skip:
            print(f"reference: Flower simulation{tag} ...", flush=True)
            flower = run_flower(workload, args.work, rounds)
            if flower is not None:
                runs.setdefault("flower", []).append(flower)
    rows = {name: combine(done) for name, done in runs.items()}
    report(rows, rounds, args.out)
    return 0


def report(rows: dict[str, dict[str, Any]], rounds: int, out: Path) -> None:
    """Print the side-by-side table (ratios to the bare loop); write it as Markdown, the JSON and the plot."""
    import torch

    bare = rows.get("bare loop")
    machine = (f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
               f"Python {platform.python_version()}, torch {torch.__version__}")
    repeats = max((len(row.get("runs", [])) for row in rows.values()), default=1)
    medians = f", median of {repeats} runs each" if repeats > 1 else ""
    lines = [f"Reference workload (shared/BENCHMARKS.md), {rounds} rounds{medians}; {machine}", "",
             f"| run | software | final acc | best acc | mean acc, last {LAST} | rounds s | median s/round | × bare "
             "| end-to-end s | peak RSS MiB (tree) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        row["ratio_to_bare"] = row["total_seconds"] / bare["total_seconds"] if bare else None
        row.setdefault("last5_accuracy", float(np.mean(row["accuracy"][-LAST:])))
        ratio = f"{row['ratio_to_bare']:.3f}" if bare else "—"
        lines.append(f"| {name} | {row['framework']} | {row['final_accuracy']:.3f} | {row['best_accuracy']:.3f} | "
                     f"{row['last5_accuracy']:.3f} | {row['total_seconds']:.1f} | "
                     f"{row['median_round_seconds']:.2f} | {ratio} | {row['end_to_end_seconds']:.1f} | "
                     f"{row['peak_rss_tree_mib']:.0f} |")
    lines.append("")
    # per-round accuracy compared with the bare loops', or with the first run's when no bare loop ran
    yardsticks = ({name: row for name, row in rows.items() if name.startswith("bare loop")}
                  or dict(list(rows.items())[:1]))
    for name, row in rows.items():
        if name in yardsticks:
            continue
        for base_name, base in yardsticks.items():
            # the project's per-round TSV keeps 6 significant digits: closer than 1e-6 is the same count
            gap = max(abs(a - b) for a, b in zip(row["accuracy"], base["accuracy"], strict=False))
            same = "identical to" if gap < 1e-6 else "differs from"
            lines.append(f"- {name}: per-round test accuracy {same} the {base_name}'s (largest gap {gap:.4f})")
    lines.extend(verdicts(rows))
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": rounds, "machine": machine, "runs": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    plot(rows, out.with_suffix(".png"))
    print(f"(written to {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')})")


def verdicts(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The first fedaudio variant against the budget: time vs the bare loop and Flower, accuracy vs Flower."""
    ours = next((name for name in rows if name.startswith("fedaudio")), None)
    if ours is None:
        return []
    row, lines = rows[ours], []
    if row.get("ratio_to_bare") is not None:
        within = "within" if row["ratio_to_bare"] <= BUDGET else "OVER"
        lines.append(f"- time {row['ratio_to_bare']:.3f}x the bare loop's ({within} the {BUDGET:.2f}x budget)")
    flower = rows.get("flower")
    if flower is not None:
        faster = "below" if row["total_seconds"] < flower["total_seconds"] else "NOT below"
        lines.append(f"- {row['total_seconds']:.1f} s vs Flower's {flower['total_seconds']:.1f} s "
                     f"({faster} Flower's)")
        for key, label in (("final_accuracy", "final"), ("best_accuracy", "best"),
                           ("last5_accuracy", f"mean of the last {LAST} rounds'")):
            gap = row[key] - flower[key]
            equal = "equal" if abs(gap) <= ACCURACY_TOLERANCE + 1e-9 else "NOT equal"
            lines.append(f"- {label} accuracy {row[key]:.3f} vs Flower's {flower[key]:.3f}: {100 * gap:+.1f} points "
                         f"({equal} within {100 * ACCURACY_TOLERANCE:.0f})")
    if flower is not None:
        share = row["peak_rss_tree_mib"] / flower["peak_rss_tree_mib"]
        within = "within" if share <= MEMORY_BUDGET else "OVER"
        lines.append(f"- peak memory of the process tree {row['peak_rss_tree_mib']:.0f} MiB vs Flower's "
                     f"{flower['peak_rss_tree_mib']:.0f} MiB: {share:.2f}x "
                     f"({within} the {MEMORY_BUDGET:.1f}x budget)")
    one, bare = rows.get("fedaudio threads:1"), rows.get("bare loop")
    if one is not None and bare is not None:  # the same arithmetic, one client at a time: what orchestration adds
        lines.append(f"- orchestration overhead: fedaudio threads:1 {one['total_seconds']:.1f} s minus the bare "
                     f"loop's {bare['total_seconds']:.1f} s = {one['total_seconds'] - bare['total_seconds']:+.1f} s "
                     f"({one['total_seconds'] / bare['total_seconds'] - 1:+.1%})")
    cores = [name for name in rows if name.startswith("bare loop")]
    if len(cores) == 2:  # the same job twice, summed in another order: how far rounding alone moves the accuracy
        a, b = rows[cores[0]], rows[cores[1]]
        gaps = ", ".join(f"{label} {100 * (a[key] - b[key]):+.1f}" for key, label in
                         (("final_accuracy", "final"), ("best_accuracy", "best"), ("last5_accuracy", f"last {LAST}")))
        lines.append(f"- rounding alone (the {cores[0]} minus the {cores[1]}, the same job): {gaps} points")
    return ["", f"Against the budget ({ours}):", *lines] if lines else []


if __name__ == "__main__":
    sys.exit(main())
