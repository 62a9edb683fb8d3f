"""federate stage: federated rounds (FedAvg family) with per-round evaluation, checkpoints and MLflow logging.

Each round: sample clients (seeded by round), fan their local training out through the flow's task runner,
aggregate, evaluate the new global model on the test split and on every client's held-out split, log the round to
MLflow (metrics with ``step=round``, the model every ``log_model_every`` rounds), then checkpoint. A killed run
resumes from its last checkpoint and ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import to_cpu_state
from fedcore.attacks import choose_malicious
from fedcore.config import Params, flatten
from fedcore.federation.checkpoint import Checkpointer, save_state
from fedcore.federation.client_store import ClientStore
from fedcore.federation.sampling import num_sampled, round_rng, sample_clients
from fedcore.federation.schedules import learning_rate
from flows import stage
from flows.runners import RUNNERS
from tasks.common import read_params, write_json, write_text
from tasks.federate import (
    aggregate_task,
    aggregator_name,
    attack_task,
    attacked_keys,
    build_aggregator,
    build_algorithm,
    build_attack,
    detection_metrics,
    evaluate_task,
    file_digest,
    fresh_model,
    load_federated_data,
    make_spec,
    plot_rounds,
    rounds_tsv,
    run_fingerprint,
    sent_keys,
    summarise_updates,
    train_client_task,
)
from tasks.progress import Progress
from tasks.tracking import FederateTracker

SUMMARY_KEYS = ("global_accuracy", "global_loss", "personalised_accuracy_mean", "personalised_accuracy_worst10")


@dataclass(frozen=True)
class FederatePaths:
    """Inputs and outputs of the stage (given by dvc.yaml)."""

    features: Path = Path("data/features")
    partition: Path = Path("data/partition/partition.json")
    poison: Path = Path("data/poison")
    checkpoints: Path = Path("checkpoints/federate")
    model: Path = Path("models/global.safetensors")
    metrics: Path = Path("metrics/federate.json")
    plots: Path = Path("plots/federate")
    root: Path = Path(".")


def parallel_workers(params: Params) -> int:
    """Clients trained at once: ``max_workers`` or the cores, never more than the clients of a round."""
    fed = params.federation
    cores = os.cpu_count() or 1
    per_round = num_sampled(params.partition.num_clients, fed.client_fraction, fed.min_clients)
    return max(1, min(fed.max_workers or cores, per_round))


def intra_op_threads(params: Params) -> int:
    """Torch threads per client, so that parallel clients do not oversubscribe the cores."""
    return max(1, (os.cpu_count() or 1) // parallel_workers(params))


def federate(params: Params, paths: FederatePaths) -> dict[str, Any]:
    """Run the federate flow with the task runner named in ``federation.runner``."""
    runner = RUNNERS.build(params.federation.runner, max_workers=parallel_workers(params))
    return federated_training.with_options(task_runner=runner)(params, paths)


@flow(name="federate", log_prints=True)
def federated_training(params: Params, paths: FederatePaths) -> dict[str, Any]:
    """Run (or resume) the federated rounds and write the final model, metrics and per-round plots."""
    fed = params.federation
    data = load_federated_data(paths.features, paths.partition, paths.poison)
    intra = intra_op_threads(params)
    torch.set_num_threads(intra)
    spec = make_spec(params, data.num_clients, data.num_classes, data.input_shape, intra)
    digest = file_digest([paths.features / "meta.json", paths.features / "index.csv", paths.partition,
                          paths.poison / "overlay.npz"])
    checkpointer = Checkpointer(paths.checkpoints, run_fingerprint(spec, digest, params))
    aggregator = build_aggregator(params)
    attack = build_attack(params)
    malicious = choose_malicious(data.num_clients, params.attack.client_fraction, params.attack.seed)
    keys = sent_keys(spec)
    forged_keys = attacked_keys(spec, keys, params.attack.include_buffers)
    # Clients keep a state of their own (on disk, one file per client and round) when they do not send everything,
    # when their rule needs it (FedU), or when they train a personal model (FML, FedMLAC, local-only).
    keep_local = build_algorithm(spec).keeps_state(len(keys) == len(fresh_model(spec, fed.seed).state_dict()))
    store = ClientStore(paths.checkpoints / CLIENTS_FOLDER) if keep_local else None

    history: list[dict[str, float]] = []
    detections: list[dict[str, Any]] = []
    start_round, run_id = 0, None
    resumed = checkpointer.load_latest()
    if resumed is not None:
        start_round, global_state, extra, meta = resumed
        history, run_id = list(meta["history"]), meta.get("mlflow_run_id")
        detections = list(meta.get("detections", []))
        if store is not None:  # states written after the checkpoint (a round cut short) are dropped
            store.rollback(start_round)
        aggregator_state = {k[len(AGGREGATOR_PREFIX):]: v for k, v in extra.items()
                            if k.startswith(AGGREGATOR_PREFIX)}
        if aggregator_state and hasattr(aggregator, "load_state_dict"):
            aggregator.load_state_dict(aggregator_state)
        # Written to stderr directly (Prefect's log_prints captures print), so the terminal always shows it.
        sys.stderr.write(f"federate: resuming after round {start_round} of {fed.rounds} from {paths.checkpoints}\n")
        sys.stderr.flush()
    else:
        global_state = to_cpu_state(fresh_model(spec, fed.seed))
        if store is not None:
            store.reset()

    tracker = FederateTracker(params.mlflow, paths.root)
    run_id = tracker.start({**flatten(params), "attack.malicious_clients": sorted(malicious)}, resume_run_id=run_id)
    log_model = fresh_model(spec, fed.seed)
    try:
        with Progress(fed.rounds, "federate rounds", key="federate-progress") as bar, \
                tempfile.TemporaryDirectory() as scratch:
            bar.update(start_round)
            for server_round in range(start_round + 1, fed.rounds + 1):
                started = time.perf_counter()
                clients = sample_clients(data.num_clients, fed.client_fraction, fed.min_clients,
                                         round_rng(fed.seed, server_round))
                futures = [train_client_task.submit(spec, c, server_round, global_state, data.train[c], store)
                           for c in clients]
                updates = sorted((f.result() for f in futures), key=lambda u: u.client_id)
                sent_global = {k: global_state[k] for k in keys}
                if malicious:
                    updates = attack_task(attack, sent_global, updates, malicious, forged_keys,
                                          params.attack.seed, server_round)
                result = aggregate_task(aggregator, sent_global, updates, server_round)
                new_state = {**global_state, **result.state}
                metrics = evaluate_task(spec, new_state, data, store, server_round)
                metrics.update(_client_means(updates))
                metrics.update(summarise_updates(updates, sent_global),
                               **detection_metrics(result, malicious, clients), lr=learning_rate(fed, server_round),
                               round_seconds=time.perf_counter() - started)
                detections.append({"round": server_round, "sampled": clients, "flagged": sorted(result.flagged),
                                   "rejected": {str(k): v for k, v in result.rejected.items()},
                                   "excluded_per_layer": {k: list(v) for k, v in result.excluded_per_layer.items()},
                                   "weights": {str(k): round(v, 6) for k, v in result.weights.items()}})
                model = None
                weights = None
                if server_round % fed.log_model_every == 0 or server_round == fed.rounds:
                    log_model.load_state_dict(new_state)
                    model = log_model
                    weights = Path(scratch) / "weights.safetensors"
                    save_state(weights, new_state)
                tracker.log_round(server_round, metrics, model, data.input_shape, weights)
                history.append({"round": float(server_round), **metrics})
                extra = {f"{AGGREGATOR_PREFIX}{k}": v for k, v in
                         (aggregator.state_dict() if hasattr(aggregator, "state_dict") else {}).items()}
                checkpointer.save(server_round, new_state, extra or None,
                                  {"history": history, "mlflow_run_id": run_id, "detections": detections})
                if store is not None:  # the checkpoint is durable: older versions of this round's clients go
                    store.commit(server_round, clients)
                global_state = new_state
                bar.update(1, {"acc": f"{metrics['global_accuracy']:.3f}", "loss": f"{metrics['global_loss']:.3f}"})
    except BaseException:
        tracker.fail()
        raise
    return _finish(params, paths, tracker, global_state, history, detections, malicious)


AGGREGATOR_PREFIX = "aggregator/"
#: Sub-folder of the checkpoints that holds the client state store.
CLIENTS_FOLDER = "clients"


def _client_means(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    """Round means of the personal-model training metrics the clients report (FML, FedMLAC, local-only)."""
    names = ("personal_train_loss", "personal_train_accuracy")
    return {f"{name}_mean": sum(float(u.metrics[name]) for u in updates) / len(updates)
            for name in names if updates and all(name in u.metrics for u in updates)}


def _detection_summary(history: list[dict[str, float]], malicious: frozenset[int]) -> dict[str, Any]:
    """Detection over the whole run: pooled precision/recall of the flagged clients against the attacked ones."""
    tp, fp, fn = (sum(row.get(f"detect_{k}", 0.0) for row in history) for k in ("tp", "fp", "fn"))
    summary: dict[str, Any] = {"malicious_clients": sorted(malicious),
                               "rejected_updates": int(sum(row.get("num_rejected", 0.0) for row in history))}
    summary["detect_precision"] = round(tp / (tp + fp), 6) if tp + fp else None
    summary["detect_recall"] = round(tp / (tp + fn), 6) if tp + fn else None
    return summary


def _finish(params: Params, paths: FederatePaths, tracker: FederateTracker, state: dict[str, torch.Tensor],
            history: list[dict[str, float]], detections: list[dict[str, Any]],
            malicious: frozenset[int]) -> dict[str, Any]:
    """Write the stage's outs (model, metrics JSON, per-round TSV and PNG), close the MLflow run, artifacts."""
    save_state(paths.model, state)
    last = history[-1]
    best = max(history, key=lambda row: row["global_accuracy"])
    summary = {key: last[key] for key in SUMMARY_KEYS if key in last}
    metrics = {
        **{key: round(value, 6) for key, value in summary.items()},
        "best_global_accuracy": round(best["global_accuracy"], 6),
        "best_round": int(best["round"]),
        "rounds": int(last["round"]),
        "seconds_total": round(sum(row["round_seconds"] for row in history), 3),
        "seconds_per_round_median": round(sorted(r["round_seconds"] for r in history)[len(history) // 2], 4),
        **_detection_summary(history, malicious),
        "mlflow_run_id": tracker.run_id,
    }
    tsv = paths.plots / "rounds.tsv"
    write_text(tsv, rounds_tsv(history))
    png = paths.plots / "rounds.png"
    plot_rounds(history, png)
    detection = paths.plots / "detection.json"
    write_json(detection, {"aggregator": aggregator_name(params), "attack": params.attack.name,
                           "malicious_clients": sorted(malicious), "rounds": detections})
    final = {k: v for k, v in metrics.items() if k.startswith("detect_") and v is not None}
    version = tracker.finish({**summary, **final}, int(last["round"]), [tsv, png, detection])
    metrics["registered_version"] = version
    write_json(paths.metrics, metrics)
    columns = ["round", "global_accuracy", "global_loss", "personalised_accuracy_mean",
               "personalised_accuracy_worst10", "train_loss_mean", "round_seconds"]
    create_table_artifact([{c: round(row.get(c, float("nan")), 4) for c in columns} for row in history],
                          key="federate-rounds", description="per-round metrics")
    create_markdown_artifact(
        f"# federate\nfinal global accuracy **{metrics['global_accuracy']:.4f}** after {metrics['rounds']} rounds "
        f"(best {metrics['best_global_accuracy']:.4f} at round {metrics['best_round']}); MLflow run "
        f"`{tracker.run_id}`, registered `{params.mlflow.registered_model}` v{version} (alias `final`).",
        key="federate-summary",
    )
    print(f"federate: final global accuracy {metrics['global_accuracy']:.4f} "
          f"(best {metrics['best_global_accuracy']:.4f} at round {metrics['best_round']}); "
          f"metrics {paths.metrics}, plot {png}, MLflow run {tracker.run_id}")
    return metrics


def _arguments(p: argparse.ArgumentParser) -> None:
    defaults = FederatePaths()
    for name in ("features", "partition", "poison", "checkpoints", "model", "metrics", "plots"):
        p.add_argument(f"--{name}", type=Path, default=getattr(defaults, name))


def _main(args: argparse.Namespace) -> None:
    params = read_params(args.params)
    paths = FederatePaths(features=args.features, partition=args.partition, poison=args.poison,
                          checkpoints=args.checkpoints, model=args.model, metrics=args.metrics, plots=args.plots,
                          root=Path.cwd())
    federate(params, paths)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m flows.federate``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
