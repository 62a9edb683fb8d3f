"""earlyexit stage: federated fine-tuning with early exits, compute-budget tiers and depth-aware aggregation.

Every client gets a budget tier (``earlyexit.tiers``, a seeded draw), i.e. the deepest exit it can afford; the
``plan`` says how deep it trains (``early_exit``: to its tier's exit; ``full``: everyone the whole model, the
straggler-prone baseline; ``drop_weak``: only the clients of the deepest tier train). Each round the sampled
clients train layers 1..d and the exit heads they reach and send only those; the server averages every entry over
the clients that sent it with weights n_c·g(l, d_c) (``weighting``) and applies ``server`` (FedAvg or FedAdam).
Every exit is scored on the test split (and the clients' held-out rows: ``val_``), and each round logs the
clients' counted training FLOPs, wall seconds and bytes sent, per tier; then a checkpoint, so a killed run
resumes to the same result. The run ends at ``earlyexit.rounds`` (else ``federation.rounds``) or, under
``earlyexit.stop: plateau`` (default), once the last exit's validation accuracy gained under
``earlyexit.plateau_min_gain`` in ``plateau_patience`` rounds; the metrics say when (``rounds``, of
``max_rounds``) and why (``stop_reason``: plateau | rounds). The final model is registered as
``earlyexit.registered_model@final``.

The rounds are :class:`fedcore.plans.earlyexit.EarlyExitPlan` run by :func:`fedcore.federation.engine.run_rounds`
(clients as task runs of this flow, each on ``federation.client_threads`` threads; the server's work on every
core); this flow reads the data and the initial weights, wires tracking and progress, and writes the outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedcore.config import Params, flatten
from flows import stage

if TYPE_CHECKING:
    import torch

    from fedcore.federation.engine import Stop
    from tasks.tracking import FederateTracker

FLOWS = stage.LazyFlows(__name__)


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
    """Run the earlyexit flow with the task runner of ``execution.runner``."""
    from flows.runners import stage_runner

    runner = stage_runner(params)
    return FLOWS["earlyexit_training"].with_options(task_runner=runner)(params, paths)


@FLOWS.flow("earlyexit_training", name="earlyexit", log_prints=True)
def _earlyexit_training(params: Params, paths: EarlyExitPaths) -> dict[str, Any]:
    """Run (or resume) the early-exit rounds; write the model, metrics, per-round table and plot."""
    from fedcore.federation.checkpoint import Checkpointer, file_digest
    from fedcore.federation.engine import run_rounds
    from fedcore.plans.earlyexit import EarlyExitPlan, plateau_rule, run_fingerprint
    from flows.runners import client_executor
    from tasks.earlyexit import initial_state, new_model, new_model_spec
    from tasks.federate import load_federated_data
    from tasks.rounds import ProgressCallback, TrackingCallback
    from tasks.tracking import FederateTracker

    fed, cfg = params.federation, params.earlyexit
    data = load_federated_data(paths.features, paths.partition, None)
    state, left = initial_state(params, data.num_classes, data.input_shape, paths.root)
    plan = EarlyExitPlan(params, data, state, client_threads=fed.client_threads)
    digest = file_digest([paths.features / "meta.json", paths.features / "index.csv", paths.partition])
    checkpointer = Checkpointer(paths.checkpoints, run_fingerprint(params, digest))
    registry = dataclasses.replace(params.mlflow, registered_model=cfg.registered_model)
    tracker = FederateTracker(registry, paths.root, model_inputs=("audio",),
                              model_spec=new_model_spec(params, data.num_classes, data.input_shape))
    last = cfg.exits[-1]

    def log_model(server_round: int, row: Mapping[str, float]) -> bool:
        # (the round a plateau stops at is logged too: TrackingCallback logs the model of the round run.stop is set)
        return server_round % params.execution.log_model_every == 0 or server_round == plan.rounds

    def postfix(row: Mapping[str, float]) -> dict[str, object]:
        return {"acc": f"{row[f'exit{last}_accuracy']:.3f}", "GFLOPs": f"{row['client_gflops_mean']:.2f}"}

    tracking = TrackingCallback(tracker, {**flatten(params), "earlyexit.client_tiers": plan.tiers},
                                run_name=f"earlyexit-{cfg.plan}", model=new_model(params, data.num_classes,
                                                                                  data.input_shape, fed.seed),
                                input_shape=data.input_shape, log_model=log_model)
    progress = ProgressCallback(plan.rounds, f"earlyexit {cfg.plan}", "earlyexit-progress", postfix)
    rule = plateau_rule(cfg)  # the plan's stop rule
    print(f"earlyexit: plan {cfg.plan}, tiers (client: depth) {dict(enumerate(plan.tiers))}; init {cfg.init}"
          + (f" ({len(left)} backbone or exit-norm entries not in the checkpoint)" if cfg.init != "random"
             else "") + f"; at most {plan.rounds} rounds"
          + (f", stop at a plateau of {rule.metric}" if rule is not None else ""))
    run = run_rounds(plan, client_executor(params), checkpointer, [tracking, progress],
                     client_threads=fed.client_threads)
    assert run.stop is not None  # run_rounds always says why it ended
    return _finish(params, paths, tracker, run.state, run.history, plan.tiers, plan.depths, run.records,
                   run.stop, plan.rounds)


def _finish(params: Params, paths: EarlyExitPaths, tracker: FederateTracker, state: dict[str, torch.Tensor],
            history: list[dict[str, float]], tiers: list[int], depths: list[int | None],
            records: Sequence[Mapping[str, Any]], stop: Stop, max_rounds: int) -> dict[str, Any]:
    """Write the stage's outs (model, metrics JSON, per-round TSV and PNG), close the MLflow run, artifacts."""
    from fedcore.federation.checkpoint import save_state
    from tasks.common import write_json, write_text
    from tasks.earlyexit import plot_exits
    from tasks.federate import rounds_tsv
    from tasks.orchestration import publish_markdown
    from tasks.rounds import split_timings, timing_summary, write_run_record

    cfg = params.earlyexit
    save_state(paths.model, state)
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
        "rounds": int(last["round"]),  # the last round run: the stop's
        "max_rounds": max_rounds,
        "stop_reason": stop.reason,  # plateau (of earlyexit.plateau_metric) | rounds (ran all max_rounds)
        "stop_detail": stop.detail,
        "rejected_updates": int(sum(r.get("num_rejected", 0.0) for r in history)),
    }
    # What differs between two runs of the same inputs stays out of the DVC outputs (see tasks.rounds).
    record = {"stage": "earlyexit", "mlflow_run_id": tracker.run_id, "registered_version": version,
              **timing_summary(timings), "round_timings": timings,
              "client_seconds_per_round_mean": round(sum(r["client_seconds_mean"] for r in history) / rounds, 6),
              "client_seconds_per_round_max": round(max(r["client_seconds_max"] for r in history), 6),
              "rejections": [{k: r[k] for k in ("round", "failed", "rejected")} for r in records if r["rejected"]]}
    for tier in sorted(set(tiers)):
        values = [r[f"tier{tier}_gflops_mean"] for r in history if f"tier{tier}_gflops_mean" in r]
        metrics[f"tier{tier}_gflops_per_round"] = round(sum(values) / len(values), 6) if values else 0.0
        per_example = [r[f"tier{tier}_mflops_per_example"] for r in history if f"tier{tier}_mflops_per_example" in r]
        metrics[f"tier{tier}_mflops_per_example"] = round(per_example[-1], 6) if per_example else None
    write_run_record(paths.metrics, record)
    write_json(paths.metrics, metrics)
    publish_markdown(
        f"# earlyexit ({cfg.plan})\nfinal-exit test accuracy **{metrics['final_exit_accuracy']:.4f}**; mean client "
        f"training {metrics['client_gflops_per_round_mean']:.3f} GFLOPs per round; stopped after round "
        f"{metrics['rounds']} of at most {max_rounds} ({stop.reason}: {stop.detail}).", key="earlyexit-summary")
    print(f"earlyexit: {cfg.plan} final-exit accuracy {metrics['final_exit_accuracy']:.4f}, mean client "
          f"{metrics['client_gflops_per_round_mean']:.3f} GFLOPs/round; stopped after round {metrics['rounds']} "
          f"of at most {max_rounds} ({stop.reason}); metrics {paths.metrics}, plot {png}")
    return {**metrics, **record}


_DEFAULTS = EarlyExitPaths()


def _main(
    params: stage.ParamsFile = stage.PARAMS_FILE,
    features: stage.FeaturesDir = _DEFAULTS.features,
    partition: stage.PartitionFile = _DEFAULTS.partition,
    checkpoints: stage.CheckpointsDir = _DEFAULTS.checkpoints,
    model: Annotated[Path, typer.Option(metavar="FILE", help="the final model, every exit "
                                                             "(safetensors)")] = _DEFAULTS.model,
    metrics: stage.MetricsFile = _DEFAULTS.metrics,
    plots: stage.PlotsDir = _DEFAULTS.plots,
) -> None:
    from tasks.common import read_params

    earlyexit(read_params(params), EarlyExitPaths(features=features, partition=partition, checkpoints=checkpoints,
                                                  model=model, metrics=metrics, plots=plots, root=Path.cwd()))


main = stage.command(__doc__, _main)
"""Command-line entry point (``python -m flows.earlyexit``)."""
__getattr__ = FLOWS.module_getattr  # from flows.earlyexit import earlyexit_training: the flow, built then

if __name__ == "__main__":
    raise SystemExit(main())
