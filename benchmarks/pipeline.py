"""Benchmark of the default workload: featurisation speed, seconds per round, peak RSS.

    make bench                      # = python -m benchmarks.pipeline
    python -m benchmarks.pipeline --rounds 5 --params params.yaml

Runs on the project's own params (default workload: FSDD, 10 clients, Dirichlet α=0.5, FedAvg, small CNN) in a
scratch folder, so the project's DVC outputs and MLflow store are untouched. The download stage's output
(data/raw) is reused when present, else the dataset is ingested first (mirror first, as in the pipeline).
Prints a table and writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil


def _peak_rss_mib() -> tuple[float, float]:
    """Peak resident set size of this process and of its waited-for children, MiB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rounds", type=int, default=None, help="override federation.rounds (default: params)")
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pipeline.json"))
    args = parser.parse_args(argv)

    from flows.stage import QUIET_ENV

    for key, value in {**QUIET_ENV, "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
        os.environ.setdefault(key, value)
    import torch
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from fedcore.plans.supervised import aggregator_name
    from flows.download import download
    from flows.federate import FederatePaths, federate
    from flows.partition import partition
    from flows.poison import poison
    from tasks.common import read_json, read_params
    from tasks.data import featurise
    from tasks.rounds import read_run_record

    params = read_params(args.params)
    if args.rounds is not None:
        params = dataclasses.replace(params, federation=dataclasses.replace(params.federation, rounds=args.rounds))
    with tempfile.TemporaryDirectory(prefix="fedaudio-bench-") as scratch_name, \
            temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        scratch = Path(scratch_name)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
        raw = args.raw
        if not (raw / "manifest.csv").exists():
            raw = scratch / "raw"
            download(params.download, raw, Path("data/downloads"))
        started = time.perf_counter()
        summary = featurise.fn(params.features, raw, scratch / "features")
        feature_seconds = time.perf_counter() - started
        partition(params.partition, scratch / "features", scratch / "partition")
        poison(params.poison, params.features, raw, scratch / "features", scratch / "partition/partition.json",
               scratch / "poison")
        paths = FederatePaths(features=scratch / "features", partition=scratch / "partition/partition.json",
                              poison=scratch / "poison", checkpoints=scratch / "ckpt", model=scratch / "model.st",
                              metrics=scratch / "metrics.json", plots=scratch / "plots", root=scratch)
        started = time.perf_counter()
        federate(params, paths)
        federate_seconds = time.perf_counter() - started
        metrics = {**read_json(paths.metrics), **read_run_record(paths.metrics)}
        rounds_tsv = (paths.plots / "rounds.tsv").read_text().splitlines()
    own, children = _peak_rss_mib()
    result = {
        "workload": f"{params.download.dataset}, {params.partition.num_clients} clients, {params.partition.scheme} "
                    f"α={params.partition.alpha:g}, {aggregator_name(params)}, {params.model.name}, "
                    f"{params.federation.rounds} rounds",
        "clips": summary["num_samples"],
        "audio_seconds": round(summary["audio_seconds"], 1),
        "featurise_seconds": round(feature_seconds, 2),
        "audio_seconds_per_second": round(summary["audio_seconds"] / feature_seconds, 1),
        "rounds": metrics["rounds"],
        "seconds_per_round_median": metrics["seconds_per_round_median"],
        "federate_seconds_total": round(federate_seconds, 1),
        "final_global_accuracy": metrics["global_accuracy"],
        "best_global_accuracy": metrics["best_global_accuracy"],
        "peak_rss_mib": round(own, 1),
        "peak_rss_children_mib": round(children, 1),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
        "torch": torch.__version__,
        "per_round": rounds_tsv,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(k) for k in result)
    print(f"\nbenchmark: {result['workload']}")
    for key, value in result.items():
        if key not in ("per_round", "workload"):
            print(f"  {key:<{width}}  {value}")
    print(f"(written to {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
