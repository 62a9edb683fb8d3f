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

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedcore.config import MlflowConfig, Params, flatten
from flows import stage

if TYPE_CHECKING:
    import torch

    from tasks.tracking import FederateTracker

FLOWS = stage.LazyFlows(__name__)
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
    #: The params file read (``--params``): names the study in the registered model's tags.
    params: Path = Path("params.yaml")




def intra_op_threads(params: Params) -> int:
    """Torch threads per client: ``federation.client_threads``, whatever the parallel clients.

    A client's arithmetic depends on its thread count (the reductions split differently), so it is a param of the
    run, not derived from the cores or ``max_workers``: the metrics are then the same at any ``max_workers``.
    """
    return params.federation.client_threads


def federate(params: Params, paths: FederatePaths) -> dict[str, Any]:
    """Run the federate flow with the task runner named in ``execution.runner``."""
    from flows.runners import stage_runner

    runner = stage_runner(params)
    return FLOWS["federated_training"].with_options(task_runner=runner)(params, paths)


@FLOWS.flow("federated_training", name="federate", log_prints=True)
def _federated_training(params: Params, paths: FederatePaths) -> dict[str, Any]:
    """Run (or resume) the federated rounds and write the final model, metrics and per-round plots."""
    import torch

    from fedcore.evaluation.downstream import load_downstream
    from fedcore.federation.checkpoint import Checkpointer, file_digest
    from fedcore.federation.engine import run_rounds
    from fedcore.models.spec import federate_model_spec
    from fedcore.plans.supervised import SupervisedPlan, evaluated_round, fresh_model, make_spec, run_fingerprint
    from fedcore.serving import ServingSpec
    from flows.runners import client_executor
    from tasks.federate import load_federated_data
    from tasks.rounds import ProgressCallback, TrackingCallback
    from tasks.tracking import FederateTracker

    fed = params.federation
    data = load_federated_data(paths.features, paths.partition, paths.poison)
    intra = intra_op_threads(params)
    torch.set_num_threads(intra)
    spec = make_spec(params, data.num_clients, data.num_classes, data.input_shape, intra)
    downstream = None
    if spec.ssl.self_supervised:
        downstream = load_downstream(paths.downstream, params.downstream)
        shapes = {name: tuple(f.shape[1:]) for name, f in downstream.features.items()}
        print(f"downstream: {len(downstream.tasks)} tasks on {', '.join(f'{k} {v}' for k, v in shapes.items())}")
    plan = SupervisedPlan(params, data, spec, client_folder=paths.checkpoints / CLIENTS_FOLDER, downstream=downstream)
    digest = file_digest([paths.features / "meta.json", paths.features / "index.csv", paths.partition,
                          paths.poison / "overlay.npz"])
    checkpointer = Checkpointer(paths.checkpoints, run_fingerprint(spec, digest, params))
    model_spec = federate_model_spec(spec.model, spec.ssl, spec.num_classes, spec.input_shape)
    # A classifier's logged models carry what classifying audio needs (serving.json: the features stage's settings,
    # statistics and class names), so that mlflow.pyfunc loads them without the data folder.
    serving = None if spec.ssl.self_supervised else ServingSpec.from_feature_store(
        paths.features, batch_size=fed.eval_batch_size)
    tracker = FederateTracker(registry_config(params), paths.root, model_spec=model_spec, serving=serving,
                              export_pt2=params.execution.export_pt2)
    primary = primary_metric(params)

    def log_model(server_round: int, row: dict[str, float]) -> bool:
        every = params.execution.log_model_every
        return evaluated_round(params, server_round) and (
            server_round % every == 0 or server_round == fed.rounds or downstream is not None)

    def postfix(row: dict[str, float]) -> dict[str, object]:
        shown: dict[str, object] = {"acc": f"{row[primary]:.3f}"} if primary in row else {}
        return {**shown, "loss": f"{row.get('global_loss', row['train_loss_mean']):.3f}"}

    tracking = TrackingCallback(tracker, {**flatten(params), "attack.malicious_clients": sorted(plan.malicious)},
                                run_name="federate", model=fresh_model(spec, fed.seed), input_shape=data.input_shape,
                                log_model=log_model, export=True)
    progress = ProgressCallback(fed.rounds, "federate rounds", "federate-progress", postfix)
    run = run_rounds(plan, client_executor(params), checkpointer, [tracking, progress], client_threads=intra)
    return _finish(params, paths, tracker, run.state, run.history, run.records, plan.malicious, run.initial)


def primary_metric(params: Params) -> str:
    """The per-round score the summary's best round and the progress bar use.

    ``global_accuracy`` (test split) for supervised runs; for self-supervised ones the mean over the downstream
    tasks of the validation score that selects rounds (``mean/knn1_val`` by default).
    """
    if params.ssl.self_supervised:
        return f"mean/{params.downstream.select_metric}_val"
    return "global_accuracy"


def registry_config(params: Params) -> MlflowConfig:
    """MLflow settings of the run: self-supervised encoders are registered under ``downstream.registered_model``."""
    if params.ssl.self_supervised:
        return dataclasses.replace(params.mlflow, registered_model=params.downstream.registered_model)
    return params.mlflow


#: Sub-folder of the checkpoints that holds the client state store.
CLIENTS_FOLDER = "clients"


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
    from fedcore.evaluation.downstream import score_names
    from fedcore.federation.checkpoint import save_state
    from fedcore.plans.supervised import aggregator_name
    from tasks.common import write_json, write_text
    from tasks.federate import plot_downstream, plot_rounds, rounds_tsv
    from tasks.orchestration import publish_markdown, publish_table
    from tasks.rounds import split_timings, timing_summary, write_run_record
    from tasks.tracking import run_link, ui_url

    save_state(paths.model, state)
    primary = primary_metric(params)
    scored = [row for row in history if primary in row]
    last = scored[-1]
    best = max(scored, key=lambda row: row[primary])
    # Downstream scores in the scorer's order: rows read back from a checkpoint have sorted keys, and a resumed run
    # must write the same bytes as an uninterrupted one.
    order = score_names([task.name for task in params.downstream.task_configs()], params.downstream)
    if params.ssl.self_supervised:
        scores = {key for key in last if "/" in key}
        summary = {key: last[key] for key in [*order, *sorted(scores - set(order))] if key in scores}
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
        metrics["floor"] = {key: round(initial[key], 6) for key in [*order, *sorted(set(initial) - set(order))]
                            if key in initial}
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
    version = tracker.finish({**summary, **final, primary: last[primary]}, int(history[-1]["round"]),
                             [tsv, png, detection], metric=primary, study=study_of(paths.params, paths.root))
    # What differs between two runs of the same inputs stays out of the DVC outputs (see tasks.rounds).
    record = {"stage": "federate", "mlflow_run_id": tracker.run_id, "registered_version": version,
              **timing_summary(timings), "round_timings": timings}
    write_run_record(paths.metrics, record)
    write_json(paths.metrics, metrics)
    publish_table([{c: round(row.get(c, float("nan")), 4) for c in columns} for row in rows],
                          key="federate-rounds", description="per-round metrics")
    publish_markdown(
        f"# federate\nfinal {primary} **{last[primary]:.4f}** after {metrics['rounds']} rounds "
        f"(best {best[primary]:.4f} at round {metrics['best_round']}); "
        f"{run_link(tracker.experiment_id, tracker.run_id)} and [its rounds charted]"
        f"({ui_url(tracker.experiment_id, 'runs', view=tracker.view)}) (with `fedaudio ui` running), registered "
        f"`{tracker.cfg.registered_model}` v{version} (alias `final`).",
        key="federate-summary",
    )
    print(f"federate: final {primary} {last[primary]:.4f} (best {best[primary]:.4f} at round "
          f"{metrics['best_round']}); metrics {paths.metrics}, plot {png}, MLflow run {tracker.run_id}")
    return {**metrics, **record}


def study_of(params_file: Path, root: Path) -> str:
    """The study whose params file is ``params_file`` (:data:`tasks.studies.STUDIES`), else that file's path."""
    from tasks.studies import STUDIES

    resolved = (root / params_file).resolve()
    for name, study in STUDIES.items():
        if (root / study.params_file).resolve() == resolved:
            return name
    return str(params_file)


def round_columns(params: Params, history: Sequence[dict[str, float]]) -> list[str]:
    """Columns of the per-round TSV: the supervised set, or the downstream scores then the training metrics."""
    from tasks.federate import ROUND_COLUMNS

    if not params.ssl.self_supervised:
        return list(ROUND_COLUMNS)
    scores = sorted({key for row in history for key in row if "/" in key})
    return ["round", *scores, "train_loss_mean", "train_loss_min", "train_loss_max", "lr", "num_clients",
            "bytes_up", "bytes_down", "num_flagged", "num_rejected", "num_failed"]


_DEFAULTS = FederatePaths()


def _main(
    params: stage.ParamsFile = stage.PARAMS_FILE,
    features: stage.FeaturesDir = _DEFAULTS.features,
    partition: stage.PartitionFile = _DEFAULTS.partition,
    poison: Annotated[Path, typer.Option(metavar="DIR", help="the attack overlay and ground truth (poison "
                                                             "stage)")] = _DEFAULTS.poison,
    checkpoints: stage.CheckpointsDir = _DEFAULTS.checkpoints,
    model: Annotated[Path, typer.Option(metavar="FILE", help="the final global model "
                                                             "(safetensors)")] = _DEFAULTS.model,
    metrics: stage.MetricsFile = _DEFAULTS.metrics,
    plots: Annotated[Path, typer.Option(metavar="DIR", help="the per-round table and plots (rounds.tsv, rounds.png, "
                                                            "detection.json)")] = _DEFAULTS.plots,
    downstream: Annotated[Path, typer.Option(metavar="DIR", help="the downstream tasks' feature stores, one per "
                                                                 "dataset (self-supervised "
                                                                 "runs)")] = _DEFAULTS.downstream,
) -> None:
    from tasks.common import read_params

    paths = FederatePaths(features=features, partition=partition, poison=poison, checkpoints=checkpoints,
                          model=model, metrics=metrics, plots=plots, root=Path.cwd(), downstream=downstream,
                          params=params)
    federate(read_params(params), paths)


main = stage.command(__doc__, _main)
"""Command-line entry point (``python -m flows.federate``)."""
__getattr__ = FLOWS.module_getattr  # from flows.federate import federated_training: the flow, built then

if __name__ == "__main__":
    raise SystemExit(main())
