"""earlyexit stage: federated fine-tuning with early exits, compute-budget tiers and depth-aware aggregation.

Every client gets a budget tier (``earlyexit.tiers``, a seeded draw), i.e. the deepest exit it can afford; the
``plan`` says how deep it trains (``early_exit``: to its tier's exit; ``full``: everyone the whole model, the
straggler-prone baseline; ``drop_weak``: only the clients of the deepest tier train). Each round the sampled
clients train layers 1..d and the exit heads they reach and send only those; the server averages every entry over
the clients that sent it with weights n_c·g(l, d_c) (``weighting``) and applies ``server`` (FedAvg or FedAdam).
Every exit is scored on the test split (and the clients' held-out rows: ``val_``), and each round logs the
clients' counted training FLOPs, wall seconds and bytes sent, per tier; then a checkpoint, so a killed run
resumes to the same result. The final model is registered as ``earlyexit.registered_model@final``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from fedcore.aggregation import AGGREGATORS
from fedcore.aggregation.state import to_cpu_state
from fedcore.algorithms.base import ClientData
from fedcore.config import Params, flatten, to_dict
from fedcore.earlyexit.aggregate import depth_aware_average, server_step
from fedcore.earlyexit.models import EarlyExitModel
from fedcore.earlyexit.train import exit_accuracies
from fedcore.errors import QuorumError
from fedcore.federation.checkpoint import Checkpointer, file_digest, fingerprint, save_state
from fedcore.federation.sampling import round_rng, sample_clients
from flows import stage
from flows.modality import client_threads
from flows.runners import task_runner
from tasks.common import read_params, write_json, write_text
from tasks.earlyexit import client_depths, initial_state, new_model, new_model_spec, plot_exits, train_exit_task
from tasks.federate import load_federated_data, rounds_tsv
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

SERVER_PREFIX = "server/"


@dataclass(frozen=True)
class EarlyExitPaths:
    """Inputs and outputs of the earlyexit stage."""

    features: Path = Path("data/features")
    partition: Path = Path("data/partition/partition.json")
    checkpoints: Path = Path("checkpoints/earlyexit")
    model: Path = Path("models/earlyexit.safetensors")
    metrics: Path = Path("metrics/earlyexit.json")
    plots: Path = Path("plots/earlyexit")
    root: Path = Path(".")


def earlyexit(params: Params, paths: EarlyExitPaths) -> dict[str, Any]:
    """Run the earlyexit flow with the task runner of ``federation.runner``."""
    workers, _ = client_threads(params)
    runner = task_runner(params.federation, workers)
    return earlyexit_training.with_options(task_runner=runner)(params, paths)


def _pooled(parts: Sequence[ClientData | None]) -> ClientData | None:
    found = [p for p in parts if p is not None]
    if not found:
        return None
    return ClientData(torch.cat([p.features for p in found]), torch.cat([p.labels for p in found]))


@flow(name="earlyexit", log_prints=True)
def earlyexit_training(params: Params, paths: EarlyExitPaths) -> dict[str, Any]:
    """Run (or resume) the early-exit rounds; write the model, metrics, per-round table and plot."""
    fed, cfg = params.federation, params.earlyexit
    if cfg.exits[-1] > params.model.depth:
        raise ValueError(f"earlyexit: the deepest exit ({cfg.exits[-1]}) must be <= model.depth "
                         f"({params.model.depth}).")
    data = load_federated_data(paths.features, paths.partition, None)
    val = _pooled(data.holdout)
    _, threads = client_threads(params)
    torch.set_num_threads(threads)
    tiers, depths = client_depths(params, data.num_clients)
    digest = file_digest([paths.features / "meta.json", paths.features / "index.csv", paths.partition])
    key = {name: to_dict(getattr(params, name)) for name in ("model", "federation", "earlyexit", "aggregation")}
    checkpointer = Checkpointer(paths.checkpoints, fingerprint({**key, "data": digest}))
    server = AGGREGATORS.build_from(cfg.server, to_dict(params.aggregation))
    model = new_model(params, data.num_classes, data.input_shape, fed.seed)
    history: list[dict[str, float]] = []
    rejections: list[dict[str, Any]] = []
    run_id = None
    resumed, resume_reports = resume_from(checkpointer, "earlyexit", reference=to_cpu_state(model))
    if resumed is not None:
        start_round, state, extra, meta = resumed
        history, run_id = list(meta["history"]), meta.get("mlflow_run_id")
        rejections = list(meta.get("rejections", []))
        if hasattr(server, "load_state_dict"):
            server.load_state_dict({k[len(SERVER_PREFIX):]: v for k, v in extra.items()})
        sys.stderr.write(f"earlyexit: resuming after round {start_round} of {fed.rounds} from {paths.checkpoints}\n")
        left: list[str] = list(meta.get("not_pretrained", []))
    else:
        start_round = 0
        state, left = initial_state(params, data.num_classes, data.input_shape, paths.root)
    registry = dataclasses.replace(params.mlflow, registered_model=cfg.registered_model)
    tracker = FederateTracker(registry, paths.root, model_inputs=("audio",),
                              model_spec=new_model_spec(params, data.num_classes, data.input_shape))
    run_id = tracker.start({**flatten(params), "earlyexit.client_tiers": tiers}, resume_run_id=run_id,
                           run_name=f"earlyexit-{cfg.plan}")
    tracker.backfill(history)  # rounds of the checkpoint the MLflow run lacks
    if resume_reports:  # what the resume had to skip (damaged or mismatching files), also printed above
        tracker.log_record(f"resume/after_round_{start_round:04d}.json", {"reports": resume_reports})
    print(f"earlyexit: plan {cfg.plan}, tiers (client: depth) {dict(enumerate(tiers))}; init {cfg.init}"
          + (f" ({len(left)} backbone entries not in the checkpoint)" if cfg.init != "random" else ""))
    try:
        with Progress(fed.rounds, f"earlyexit {cfg.plan}", key="earlyexit-progress") as bar, \
                tempfile.TemporaryDirectory() as scratch:
            bar.update(start_round)
            for server_round in range(start_round + 1, fed.rounds + 1):
                started = time.perf_counter()
                sampled = sample_clients(data.num_clients, fed.client_fraction, fed.min_clients,
                                         round_rng(fed.seed, server_round))
                jobs = [(c, depth) for c in sampled if (depth := depths[c]) is not None]
                futures = [(c, train_exit_task.submit(params, c, server_round, state, data.train[c], depth,
                                                      data.num_classes, data.input_shape, threads))
                           for c, depth in jobs]
                updates, failed = gather_updates(futures)
                try:
                    averaged = depth_aware_average(state, updates, {c: d for c, d in jobs}, model.layer_of,
                                                   cfg.weighting, server_round=server_round, failed=failed,
                                                   min_accepted=quorum_of(fed, len(jobs)))
                except QuorumError as error:
                    raise stop_on_quorum(error, "earlyexit", paths.checkpoints, server_round - 1) from None
                rejections.append(rejection_record(server_round, failed, averaged.rejected))
                if rejections[-1]["rejected"]:
                    tracker.log_record(f"rejections/round_{server_round:04d}.json", rejections[-1])
                updates = [u for u in updates if u.client_id not in averaged.rejected]
                state = server_step(server, state, averaged.state, server_round)
                model.load_state_dict(state)
                metrics = _round_metrics(model, data.test, val, updates, tiers, data.num_clients,
                                         fed.eval_batch_size)
                metrics.update(num_rejected=float(len(averaged.rejected)), num_failed=float(len(failed)),
                               round_seconds=time.perf_counter() - started)
                weights = Path(scratch) / "weights.safetensors"
                save_state(weights, state)
                log_now = server_round % fed.log_model_every == 0 or server_round == fed.rounds
                tracker.log_round(server_round, metrics, model if log_now else None, data.input_shape,
                                  weights if log_now else None)
                history.append({"round": float(server_round), **metrics})
                extra = {f"{SERVER_PREFIX}{k}": v for k, v in
                         (server.state_dict() if hasattr(server, "state_dict") else {}).items()}
                checkpointer.save(server_round, state, extra or None,
                                  {"history": history, "mlflow_run_id": run_id, "not_pretrained": left,
                                   "rejections": rejections})
                last = cfg.exits[-1]
                bar.update(1, {"acc": f"{metrics[f'exit{last}_accuracy']:.3f}",
                               "GFLOPs": f"{metrics['client_gflops_mean']:.2f}"})
    except BaseException:
        tracker.fail()
        raise
    model.load_state_dict(state)
    return _finish(params, paths, tracker, model, history, tiers, depths, rejections)


def _round_metrics(model: EarlyExitModel, test: ClientData, val: ClientData | None, updates: Sequence[Any],
                   tiers: Sequence[int], num_clients: int, batch_size: int) -> dict[str, float]:
    """Per-exit accuracies and the round's compute accounting (overall and per tier)."""
    metrics = {f"exit{e}_accuracy": v for e, v in exit_accuracies(model, test, batch_size).items()}
    if val is not None:
        metrics.update({f"val_exit{e}_accuracy": v for e, v in exit_accuracies(model, val, batch_size).items()})
    flops = [u.metrics["train_flops"] for u in updates]
    metrics.update(
        num_clients=float(len(updates)),
        client_gflops_mean=sum(flops) / len(flops) / 1e9 if flops else 0.0,
        client_seconds_mean=sum(u.metrics["train_seconds"] for u in updates) / max(1, len(updates)),
        client_seconds_max=max((u.metrics["train_seconds"] for u in updates), default=0.0),
        bytes_up=float(sum(u.metrics["bytes_sent"] for u in updates)),
        train_loss_mean=sum(u.metrics["train_loss"] for u in updates) / max(1, len(updates)),
    )
    per_tier: dict[int, list[Any]] = defaultdict(list)
    for update in updates:
        per_tier[tiers[update.client_id]].append(update)
    for tier, members in sorted(per_tier.items()):
        metrics[f"tier{tier}_gflops_mean"] = sum(u.metrics["train_flops"] for u in members) / len(members) / 1e9
        metrics[f"tier{tier}_seconds_mean"] = sum(u.metrics["train_seconds"] for u in members) / len(members)
        metrics[f"tier{tier}_mflops_per_example"] = sum(u.metrics["flops_per_example"] for u in members) / len(
            members) / 1e6
    return metrics


def _finish(params: Params, paths: EarlyExitPaths, tracker: FederateTracker, model: EarlyExitModel,
            history: list[dict[str, float]], tiers: list[int], depths: list[int | None],
            rejections: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    cfg = params.earlyexit
    save_state(paths.model, {k: v.detach() for k, v in model.state_dict().items()})
    last = history[-1]
    exits = list(cfg.exits)
    columns = ["round", *[f"exit{e}_accuracy" for e in exits], *[f"val_exit{e}_accuracy" for e in exits],
               "client_gflops_mean", "bytes_up", "num_clients", "num_rejected", "num_failed", "train_loss_mean"]
    rows, timings = split_timings(history)
    tsv, png = paths.plots / "rounds.tsv", paths.plots / "rounds.png"
    write_text(tsv, rounds_tsv(rows, [c for c in columns if any(c in row for row in rows)]))
    plot_exits(rows, exits, png, f"early exit: {cfg.plan}, weighting {cfg.weighting}, server {cfg.server}")
    summary = {k: v for k, v in last.items() if k.endswith("_accuracy")}
    version = tracker.finish(summary, int(last["round"]), [tsv, png])
    rounds = len(history)
    metrics = {
        "plan": cfg.plan, "weighting": cfg.weighting, "server": cfg.server, "init": cfg.init,
        "client_tiers": tiers, "client_depths": depths,
        **{k: round(v, 6) for k, v in summary.items()},
        "final_exit_accuracy": round(last[f"exit{exits[-1]}_accuracy"], 6),
        "client_gflops_per_round_mean": round(sum(r["client_gflops_mean"] for r in history) / rounds, 6),
        "bytes_up_total": int(sum(r["bytes_up"] for r in history)),
        "rounds": int(last["round"]),
        "rejected_updates": int(sum(r.get("num_rejected", 0.0) for r in history)),
    }
    # What differs between two runs of the same inputs stays out of the DVC outputs (see tasks.rounds).
    record = {"stage": "earlyexit", "mlflow_run_id": tracker.run_id, "registered_version": version,
              **timing_summary(timings), "round_timings": timings,
              "client_seconds_per_round_mean": round(sum(r["client_seconds_mean"] for r in history) / rounds, 6),
              "client_seconds_per_round_max": round(max(r["client_seconds_max"] for r in history), 6),
              "rejections": [r for r in rejections or [] if r["rejected"]]}
    for tier in sorted(set(tiers)):
        values = [r[f"tier{tier}_gflops_mean"] for r in history if f"tier{tier}_gflops_mean" in r]
        metrics[f"tier{tier}_gflops_per_round"] = round(sum(values) / len(values), 6) if values else 0.0
        per_example = [r[f"tier{tier}_mflops_per_example"] for r in history if f"tier{tier}_mflops_per_example" in r]
        metrics[f"tier{tier}_mflops_per_example"] = round(per_example[-1], 6) if per_example else None
    write_run_record(paths.metrics, record)
    write_json(paths.metrics, metrics)
    create_markdown_artifact(
        f"# earlyexit ({cfg.plan})\nfinal-exit test accuracy **{metrics['final_exit_accuracy']:.4f}**; mean client "
        f"training {metrics['client_gflops_per_round_mean']:.3f} GFLOPs per round.", key="earlyexit-summary")
    print(f"earlyexit: {cfg.plan} final-exit accuracy {metrics['final_exit_accuracy']:.4f}, mean client "
          f"{metrics['client_gflops_per_round_mean']:.3f} GFLOPs/round; metrics {paths.metrics}, plot {png}")
    return {**metrics, **record}


def _arguments(p: argparse.ArgumentParser) -> None:
    defaults = EarlyExitPaths()
    for name in ("features", "partition", "checkpoints", "model", "metrics", "plots"):
        p.add_argument(f"--{name}", type=Path, default=getattr(defaults, name))


def _main(args: argparse.Namespace) -> None:
    params = read_params(args.params)
    earlyexit(params, EarlyExitPaths(features=args.features, partition=args.partition, checkpoints=args.checkpoints,
                                     model=args.model, metrics=args.metrics, plots=args.plots, root=Path.cwd()))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m flows.earlyexit``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
