"""Memory and time against the number of registered clients: peak RSS and seconds per round of the federate flow.

    python -m benchmarks.client_scale                        # FML, 20 vs 1,000 clients, 10 sampled per round
    python -m benchmarks.client_scale --clients 20,1000,5000 --algorithm fedmlac --rounds 5
    make bench-scale    # cross-device: FedAvg, 100 vs 10,000 clients of 20 clips, 10 and 50 sampled per round

Every run with the same ``--sampled`` trains that many clients per round on alike data, so each round's work is
the same whatever the number registered. ``--scheme iid`` splits the project's dataset IID over K clients (each
holds n/K clips, so K is bounded by the dataset); ``--scheme cross_device`` gives each of K clients
``--samples-per-client`` clips of its own Dirichlet label mix, shared between clients when K exceeds the pool
(10,000 phones over FSDD's 2,700 training clips). With FML/FedMLAC/local each client has a personal model,
whose weights and optimiser state live in the on-disk client store. Each run is the real federate flow
(``python -m flows.federate``: Prefect tasks, MLflow logging, checkpoints, per-round evaluation of every client's
personal model on its held-out split) in a child process; its resident memory is sampled every 50 ms with psutil
(the flow process alone, and with its children, e.g. Prefect's temporary server). Prints a table, and the ratio of
each run's peak to the first one's, and writes benchmarks/results/client_scale.json.

Needs the dataset's raw audio (``dvc repro download``, i.e. data/raw) or ingests it from the mirror into a
scratch folder first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import yaml

from benchmarks.procs import run_measured
from tasks.rounds import read_run_record


def run_federate(params_file: Path, scratch: Path, name: str) -> dict[str, Any]:
    """Run the federate stage in a child process; return its peak RSS (MiB), wall time and metrics."""
    command = [sys.executable, "-m", "flows.federate", "--params", str(params_file),
               "--features", str(scratch / "features"), "--partition", str(scratch / name / "partition.json"),
               "--poison", str(scratch / name / "poison"), "--checkpoints", str(scratch / name / "ckpt"),
               "--model", str(scratch / name / "model.st"), "--metrics", str(scratch / name / "metrics.json"),
               "--plots", str(scratch / name / "plots")]
    run = run_measured(command)
    if run.returncode != 0:
        raise SystemExit(f"client_scale: the federate run {name} failed (exit {run.returncode}):\n"
                         f"{run.stderr[-3000:]}")
    metrics = json.loads((scratch / name / "metrics.json").read_text())
    metrics.update(read_run_record(scratch / name / "metrics.json"))  # timings live in the run record
    store = scratch / name / "ckpt" / "clients"
    store_bytes = sum(p.stat().st_size for p in store.rglob("*.safetensors")) if store.is_dir() else 0
    return {"peak_rss_mib": round(run.peak_rss_mib, 1), "peak_rss_tree_mib": round(run.peak_rss_tree_mib, 1),
            "seconds": round(run.seconds, 1), "seconds_per_round_median": metrics["seconds_per_round_median"],
            "global_accuracy": metrics["global_accuracy"],
            "personalised_accuracy_mean": metrics.get("personalised_accuracy_mean"),
            "client_store_mib": round(store_bytes / 2**20, 2),
            "clients_in_store": sum(1 for _ in store.iterdir()) if store.is_dir() else 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--clients", default="20,1000", help="comma-separated client counts (default 20,1000)")
    parser.add_argument("--sampled", default="10", help="comma-separated clients per round (default 10)")
    parser.add_argument("--scheme", default="iid", choices=["iid", "cross_device"])
    parser.add_argument("--samples-per-client", type=int, default=20, help="cross_device: clips per client")
    parser.add_argument("--holdout", type=float, default=0.34,
                        help="partition.holdout_fraction (0: evaluate the global model on the test split only)")
    parser.add_argument("--depth", type=int, default=2, help="model.depth of the small CNN (default 2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--algorithm", default="fml", help="federation.local_algorithm (default fml)")
    parser.add_argument("--width", type=int, default=4, help="model.width of the small CNN (default 4)")
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/client_scale.json"))
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    per_round = [int(c) for c in args.sampled.split(",")]

    from flows.stage import QUIET_ENV

    for key, value in {**QUIET_ENV, "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
        os.environ.setdefault(key, value)
    from flows.download import download
    from flows.partition import partition
    from tasks.common import read_params
    from tasks.data import featurise

    raw_params = yaml.safe_load(Path(args.params).read_text()) or {}
    base = read_params(args.params)
    results: dict[tuple[int, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fedaudio-scale-") as scratch_name:
        scratch = Path(scratch_name)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
        raw = args.raw
        if not (raw / "manifest.csv").exists():
            raw = scratch / "raw"
            download(base.download, raw, Path("data/downloads"))
        featurise.fn(base.features, raw, scratch / "features")
        for sampled in per_round:
            for count in counts:
                name = f"k{count}-s{sampled}"
                params = json.loads(json.dumps(raw_params))
                params["partition"].update(scheme=args.scheme, num_clients=count, min_samples=1,
                                           samples_per_client=args.samples_per_client,
                                           holdout_fraction=args.holdout)
                params["model"].update(name="cnn", width=args.width, depth=args.depth)
                params["federation"].update(rounds=args.rounds, client_fraction=min(1.0, sampled / count),
                                            min_clients=sampled, local_algorithm=args.algorithm,
                                            aggregator=None)
                params.setdefault("execution", {}).update(log_model_every=args.rounds)
                params["mlflow"].update(experiment="fedaudio-client-scale", registered_model="")
                params_file = scratch / f"{name}.yaml"
                params_file.write_text(yaml.safe_dump(params, sort_keys=False))
                partition(read_params(params_file).partition, scratch / "features", scratch / name)
                print(f"client_scale: {count} clients, {sampled} per round, {args.rounds} rounds ...", flush=True)
                results[count, sampled] = run_federate(params_file, scratch, name)
                print(f"  {results[count, sampled]}", flush=True)
    for (_, sampled), result in results.items():
        first = results[counts[0], sampled]
        result["rss_ratio_to_first"] = round(result["peak_rss_mib"] / first["peak_rss_mib"], 3)
        result["time_ratio_to_first"] = round(result["seconds_per_round_median"]
                                              / first["seconds_per_round_median"], 3)
    clips = f"{args.samples_per_client} clips per client" if args.scheme == "cross_device" else "IID"
    summary = {
        "workload": f"{base.download.dataset}, {args.scheme} ({clips}), {args.rounds} rounds, {args.algorithm}, "
                    f"cnn width {args.width} depth {args.depth}, holdout {args.holdout:g}",
        "runs": {f"{k} clients, {s} per round": v for (k, s), v in results.items()},
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nclient_scale: {summary['workload']}")
    print(f"{'clients':>8} {'per round':>9} {'peak RSS MiB':>13} {'with children':>14} {'ratio':>6} {'s/round':>8} "
          f"{'ratio':>6} {'store MiB':>10} {'acc':>6} {'pers. acc':>9}")
    for (count, sampled), r in results.items():
        pers = r["personalised_accuracy_mean"]
        print(f"{count:>8} {sampled:>9} {r['peak_rss_mib']:>13.1f} {r['peak_rss_tree_mib']:>14.1f} "
              f"{r['rss_ratio_to_first']:>6.3f} {r['seconds_per_round_median']:>8.2f} "
              f"{r['time_ratio_to_first']:>6.3f} {r['client_store_mib']:>10.2f} {r['global_accuracy']:>6.3f} "
              f"{'—' if pers is None else f'{pers:.3f}':>9}")
    print(f"(written to {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
