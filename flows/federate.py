"""federate stage: federated rounds (FedAvg family) with per-round evaluation, checkpoints and MLflow logging.

Each round: sample clients (seeded by round), fan their local training out through the flow's task runner,
aggregate, evaluate the new global model on the test split and on every client's held-out split, log the round to
MLflow (metrics with ``step=round``, the model every ``log_model_every`` rounds), then checkpoint. A killed run
resumes from its last checkpoint and ends with the same metrics as an uninterrupted one.

With a self-supervised ``ssl.method`` the clients train on their audio without labels, and every
``downstream.every`` rounds the global encoder is scored on every downstream task (``--downstream``: a folder of
feature stores, one per dataset) and logged with its model, so that ``flows.select`` can register each task's best
round (FASSL). The random-init encoder is scored first, as round 0: the floor.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from fedcore.config import MlflowConfig, Params, flatten
from fedcore.errors import QuorumError
from fedcore.federation.checkpoint import Checkpointer, save_state
from fedcore.federation.client_store import ClientStore
from fedcore.federation.sampling import num_sampled, round_rng, sample_clients
from fedcore.federation.schedules import learning_rate
from fedcore.models.spec import federate_model_spec
from flows import stage
from flows.runners import task_runner
from tasks.common import read_params, write_json, write_text
from tasks.downstream import downstream_task, load_downstream
from tasks.federate import (
    ROUND_COLUMNS,
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
    plot_downstream,
    plot_rounds,
    rounds_tsv,
    run_fingerprint,
    sent_keys,
    summarise_updates,
    train_client_task,
)
from tasks.progress import Progress
from tasks.rounds import (
    gather_updates,
    quorum_of,
    rejection_record,
    resume_from,
    split_timings,
    stop_on_quorum,
    timing_summary,
    write_run_record,
)
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
    #: Feature stores of the downstream tasks, ``<downstream>/<dataset>`` (self-supervised runs).
    downstream: Path = Path("data/downstream")


def parallel_workers(params: Params) -> int:
    """Clients trained at once: ``max_workers`` or the cores, never more than the clients of a round."""
    fed = params.federation
    cores = os.cpu_count() or 1
    per_round = num_sampled(params.partition.num_clients, fed.client_fraction, fed.min_clients)
    return max(1, min(fed.max_workers or cores, per_round))


def intra_op_threads(params: Params) -> int:
    """Torch threads per client: ``federation.client_threads``, whatever the parallel clients.

    A client's arithmetic depends on its thread count (the reductions split differently), so it is a param of the
    run, not derived from the cores or ``max_workers``: the metrics are then the same at any ``max_workers``.
    """
    return params.federation.client_threads


def federate(params: Params, paths: FederatePaths) -> dict[str, Any]:
    """Run the federate flow with the task runner named in ``federation.runner``."""
    runner = task_runner(params.federation, parallel_workers(params))
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
    initial_state = to_cpu_state(fresh_model(spec, fed.seed))  # round 0, and what a checkpoint must fit
    keep_local = build_algorithm(spec).keeps_state(len(keys) == len(initial_state))
    store = ClientStore(paths.checkpoints / CLIENTS_FOLDER) if keep_local else None

    history: list[dict[str, float]] = []
    detections: list[dict[str, Any]] = []
    start_round, run_id = 0, None
    resumed, resume_reports = resume_from(checkpointer, "federate",
                                          reference=initial_state,
                                          also_verify=store.verify if store is not None else None)
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
        global_state = initial_state
        if store is not None:
            store.reset()

    downstream = load_downstream(paths.downstream, params.downstream) if spec.ssl.self_supervised else None
    model_spec = federate_model_spec(spec.model, spec.ssl, spec.num_classes, spec.input_shape)
    tracker = FederateTracker(registry_config(params), paths.root, model_spec=model_spec)
    run_id = tracker.start({**flatten(params), "attack.malicious_clients": sorted(malicious)}, resume_run_id=run_id)
    log_model = fresh_model(spec, fed.seed)
    # One-time set-up, like starting the MLflow run: trace the architecture now, so that each round's logging
    # only swaps its weights into the program.
    tracker.prepare_export(log_model, data.input_shape, WEIGHTS_FILE)
    if downstream is not None and resumed is None:  # the random-init encoder: the floor, logged as round 0
        floor = downstream_task(spec, global_state, downstream, params.downstream)
        log_model.load_state_dict(global_state)
        with tempfile.TemporaryDirectory() as scratch:
            floor_weights = Path(scratch) / WEIGHTS_FILE
            save_state(floor_weights, global_state)
            tracker.log_round(0, floor, log_model, data.input_shape, floor_weights)
        initial = floor
    else:
        initial = dict(resumed[3].get("initial", {})) if resumed is not None else {}
    tracker.backfill([{"round": 0.0, **initial}, *history] if initial else history)  # rounds the run lacks
    if resume_reports:  # what the resume had to skip (damaged or mismatching files), also printed above
        tracker.log_record(f"resume/after_round_{start_round:04d}.json", {"reports": resume_reports})
    primary = primary_metric(params)
    try:
        with Progress(fed.rounds, "federate rounds", key="federate-progress") as bar, \
                tempfile.TemporaryDirectory() as scratch:
            bar.update(start_round)
            for server_round in range(start_round + 1, fed.rounds + 1):
                started = time.perf_counter()
                clients = sample_clients(data.num_clients, fed.client_fraction, fed.min_clients,
                                         round_rng(fed.seed, server_round))
                torch.set_num_threads(intra)  # clients in parallel, each on its share of the cores
                futures = [(c, train_client_task.submit(spec, c, server_round, global_state, data.train[c], store))
                           for c in clients]
                updates, failed = gather_updates(futures)
                torch.set_num_threads(os.cpu_count() or 1)  # no client trains now: the server's work gets them all
                sent_global = {k: global_state[k] for k in keys}
                if malicious and updates:
                    updates = attack_task(attack, sent_global, updates, malicious, forged_keys,
                                          params.attack.seed, server_round)
                try:
                    result = aggregate_task(aggregator, sent_global, updates, server_round, failed,
                                            quorum_of(fed, len(clients)))
                except QuorumError as error:
                    raise stop_on_quorum(error, "federate", paths.checkpoints, server_round - 1) from None
                new_state = {**global_state, **result.state}
                scored = evaluated_round(params, server_round)
                if downstream is None:
                    metrics = evaluate_task(spec, new_state, data, store, server_round)
                else:
                    metrics = downstream_task(spec, new_state, downstream, params.downstream) if scored else {}
                metrics.update(_client_means(updates))
                metrics["num_failed"] = float(len(failed))
                metrics.update(summarise_updates(updates, sent_global),
                               **detection_metrics(result, malicious, clients), lr=learning_rate(fed, server_round),
                               round_seconds=time.perf_counter() - started)
                detections.append({"round": server_round, "sampled": clients, "flagged": sorted(result.flagged),
                                   "failed": sorted(failed),
                                   "rejected": {str(k): v for k, v in result.rejected.items()},
                                   "excluded_per_layer": {k: list(v) for k, v in result.excluded_per_layer.items()},
                                   "weights": {str(k): round(v, 6) for k, v in result.weights.items()}})
                if result.rejected:
                    tracker.log_record(f"rejections/round_{server_round:04d}.json",
                                       rejection_record(server_round, failed, result.rejected))
                model = None
                weights = None
                if scored and (server_round % fed.log_model_every == 0 or server_round == fed.rounds
                               or downstream is not None):
                    log_model.load_state_dict(new_state)
                    model = log_model
                    weights = Path(scratch) / WEIGHTS_FILE
                    save_state(weights, new_state)
                tracker.log_round(server_round, metrics, model, data.input_shape, weights)
                history.append({"round": float(server_round), **metrics})
                extra = {f"{AGGREGATOR_PREFIX}{k}": v for k, v in
                         (aggregator.state_dict() if hasattr(aggregator, "state_dict") else {}).items()}
                checkpointer.save(server_round, new_state, extra or None,
                                  {"history": history, "mlflow_run_id": run_id, "detections": detections,
                                   "initial": initial})
                if store is not None:  # the checkpoint is durable: versions no kept checkpoint needs go
                    store.commit(server_round, clients, oldest_kept=checkpointer.kept_rounds()[0])
                # The whole round, logging and checkpoint included (a resumed run's last row before the kill
                # keeps round_seconds only).
                history[-1]["round_wall_seconds"] = time.perf_counter() - started
                global_state = new_state
                shown = {"acc": f"{metrics[primary]:.3f}"} if primary in metrics else {}
                bar.update(1, {**shown, "loss": f"{metrics.get('global_loss', metrics['train_loss_mean']):.3f}"})
    except BaseException:
        tracker.fail()
        raise
    return _finish(params, paths, tracker, global_state, history, detections, malicious, initial)


def primary_metric(params: Params) -> str:
    """The per-round score the summary's best round and the progress bar use.

    ``global_accuracy`` (test split) for supervised runs; for self-supervised ones the mean over the downstream
    tasks of the validation score that selects rounds (``mean/knn1_val`` by default).
    """
    if params.ssl.self_supervised:
        return f"mean/{params.downstream.select_metric}_val"
    return "global_accuracy"


def evaluated_round(params: Params, server_round: int) -> bool:
    """Whether ``server_round`` is scored: every round (supervised), every ``downstream.every`` and the last (SSL)."""
    every = params.downstream.every if params.ssl.self_supervised else 1
    return server_round % every == 0 or server_round == params.federation.rounds


def registry_config(params: Params) -> MlflowConfig:
    """MLflow settings of the run: self-supervised encoders are registered under ``downstream.registered_model``."""
    if params.ssl.self_supervised:
        return dataclasses.replace(params.mlflow, registered_model=params.downstream.registered_model)
    return params.mlflow


AGGREGATOR_PREFIX = "aggregator/"
#: Name of the safetensors weights attached to every logged round model.
WEIGHTS_FILE = "weights.safetensors"
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
            malicious: frozenset[int], initial: dict[str, float] | None = None) -> dict[str, Any]:
    """Write the stage's outs (model, metrics JSON, per-round TSV and PNG), close the MLflow run, artifacts."""
    save_state(paths.model, state)
    primary = primary_metric(params)
    scored = [row for row in history if primary in row]
    last = scored[-1]
    best = max(scored, key=lambda row: row[primary])
    if params.ssl.self_supervised:
        summary = {key: value for key, value in last.items() if "/" in key}
    else:
        summary = {key: last[key] for key in SUMMARY_KEYS if key in last}
    rows, timings = split_timings(history)
    metrics = {
        **{key: round(value, 6) for key, value in summary.items()},
        f"best_{primary.replace('/', '_')}": round(best[primary], 6),
        "best_round": int(best["round"]),
        "rounds": int(history[-1]["round"]),
        **_detection_summary(history, malicious),
    }
    if initial:
        metrics["floor"] = {key: round(value, 6) for key, value in initial.items()}
    tsv = paths.plots / "rounds.tsv"
    columns = round_columns(params, rows)
    write_text(tsv, rounds_tsv(rows, columns))
    png = paths.plots / "rounds.png"
    if params.ssl.self_supervised:
        plot_downstream(history, initial or {}, params.downstream, png)
    else:
        plot_rounds(history, png)
    detection = paths.plots / "detection.json"
    write_json(detection, {"aggregator": aggregator_name(params), "attack": params.attack.name,
                           "malicious_clients": sorted(malicious), "rounds": detections}, sort_keys=True)
    final = {k: v for k, v in metrics.items() if k.startswith("detect_") and v is not None}
    version = tracker.finish({**summary, **final}, int(history[-1]["round"]), [tsv, png, detection])
    # What differs between two runs of the same inputs stays out of the DVC outputs (see tasks.rounds).
    record = {"stage": "federate", "mlflow_run_id": tracker.run_id, "registered_version": version,
              **timing_summary(timings), "round_timings": timings}
    write_run_record(paths.metrics, record)
    write_json(paths.metrics, metrics)
    create_table_artifact([{c: round(row.get(c, float("nan")), 4) for c in columns} for row in rows],
                          key="federate-rounds", description="per-round metrics")
    create_markdown_artifact(
        f"# federate\nfinal {primary} **{last[primary]:.4f}** after {metrics['rounds']} rounds "
        f"(best {best[primary]:.4f} at round {metrics['best_round']}); MLflow run "
        f"`{tracker.run_id}`, registered `{tracker.cfg.registered_model}` v{version} (alias `final`).",
        key="federate-summary",
    )
    print(f"federate: final {primary} {last[primary]:.4f} (best {best[primary]:.4f} at round "
          f"{metrics['best_round']}); metrics {paths.metrics}, plot {png}, MLflow run {tracker.run_id}")
    return {**metrics, **record}


def round_columns(params: Params, history: Sequence[dict[str, float]]) -> list[str]:
    """Columns of the per-round TSV: the supervised set, or the downstream scores then the training metrics."""
    if not params.ssl.self_supervised:
        return list(ROUND_COLUMNS)
    scores = sorted({key for row in history for key in row if "/" in key})
    return ["round", *scores, "train_loss_mean", "train_loss_min", "train_loss_max", "lr", "num_clients",
            "bytes_up", "bytes_down", "num_flagged", "num_rejected", "num_failed"]


def _arguments(p: argparse.ArgumentParser) -> None:
    defaults = FederatePaths()
    for name in ("features", "partition", "poison", "checkpoints", "model", "metrics", "plots", "downstream"):
        p.add_argument(f"--{name}", type=Path, default=getattr(defaults, name))


def _main(args: argparse.Namespace) -> None:
    params = read_params(args.params)
    paths = FederatePaths(features=args.features, partition=args.partition, poison=args.poison,
                          checkpoints=args.checkpoints, model=args.model, metrics=args.metrics, plots=args.plots,
                          root=Path.cwd(), downstream=args.downstream)
    federate(params, paths)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m flows.federate``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
