"""modality stage: modality-wise audio-visual federated training (UniFL, MultiFL, Harmony, ModalityMirror phase 1).

``python -m flows.modality`` runs the method of ``modality.method`` over the partition's clients, of which a seeded
draw (``modality.missing_rate``) keeps the video; the visual store comes from the ``av`` stage (``flows.av``).
Every round: the clients train their phase's tasks, each parameter group is aggregated over the clients that
trained it (modality-wise), the model is scored on the test split (audio-only as the method serves audio-only
clients; audio-visual), logged to MLflow with ``step=round`` and its model, then checkpointed. A killed run
resumes from its last checkpoint to the same result. At the end the AV model is registered as
``modality.registered_model@final`` and its audio branch as ``modality.registered_audio@final``: the teacher and
the student the ``distill`` stage starts from (ModalityMirror phase 2).

The rounds are :class:`fedcore.plans.modality.ModalityPlan` run by :func:`fedcore.federation.engine.run_rounds`
(clients as task runs of this flow, each on ``federation.client_threads`` threads; the server's work on every
core); this flow reads the data, wires tracking and progress, and writes the outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from fedcore.config import Params, flatten
from flows import stage

if TYPE_CHECKING:
    from fedcore.multimodal import AVModel
    from tasks.tracking import FederateTracker

#: Tag of the logged audio branch: the round of the AV model it was cut from.
BRANCH_TAG = "fedaudio.audio_branch_of_round"
ROUND_COLUMNS = ("round", "phase", "audio_accuracy", "audio_branch_accuracy", "av_accuracy", "zero_video_accuracy",
                 "val_audio_accuracy", "val_av_accuracy", "train_loss_mean", "num_clients", "num_audio_clients",
                 "num_visual_clients", "num_rejected", "num_failed", "lr")
FLOWS = stage.LazyFlows(__name__)


@dataclass(frozen=True)
class ModalityPaths:
    """Inputs and outputs of the modality stage."""

    features: Path = Path("data/features")
    partition: Path = Path("data/partition/partition.json")
    visual: Path = Path("data/av")
    checkpoints: Path = Path("checkpoints/modality")
    model: Path = Path("models/av.safetensors")
    metrics: Path = Path("metrics/modality.json")
    plots: Path = Path("plots/modality")
    root: Path = Path(".")


def modality(params: Params, paths: ModalityPaths) -> dict[str, Any]:
    """Run the modality flow with the task runner of ``execution.runner`` (threads by default)."""
    from flows.runners import stage_runner

    runner = stage_runner(params)
    return FLOWS["modality_training"].with_options(task_runner=runner)(params, paths)


@FLOWS.flow("modality_training", name="modality", log_prints=True)
def _modality_training(params: Params, paths: ModalityPaths) -> dict[str, Any]:
    """Run (or resume) the audio-visual method's rounds; write the model, metrics, per-round table and plot."""
    from fedcore.federation.checkpoint import Checkpointer, file_digest
    from fedcore.federation.engine import run_rounds
    from fedcore.plans.modality import ModalityPlan, run_fingerprint
    from flows.runners import client_executor
    from tasks.modality import AV_INPUTS, load_av_data, new_model_spec
    from tasks.rounds import ProgressCallback, TrackingCallback
    from tasks.tracking import FederateTracker

    fed, cfg = params.federation, params.modality
    data = load_av_data(paths.features, paths.partition, paths.visual, cfg)
    plan = ModalityPlan(params, data)
    digest = file_digest([paths.features / "meta.json", paths.features / "index.csv", paths.partition,
                          paths.visual / "meta.json"])
    checkpointer = Checkpointer(paths.checkpoints, run_fingerprint(params, digest))
    registry = dataclasses.replace(params.mlflow, registered_model=cfg.registered_model)
    tracker = FederateTracker(registry, paths.root, model_inputs=AV_INPUTS, model_spec=new_model_spec(params, data))
    video = sorted(plan.video)

    def log_model(server_round: int, row: Mapping[str, float]) -> bool:
        return server_round % params.execution.log_model_every == 0 or server_round == fed.rounds

    def postfix(row: Mapping[str, float]) -> dict[str, object]:
        return {"audio": f"{row['audio_accuracy']:.3f}", "phase": plan.phase(int(row["round"]))[1].name}

    tracking = TrackingCallback(tracker, {**flatten(params), "modality.video_clients": video},
                                run_name=f"modality-{cfg.method}", model=plan.model, input_shape=data.audio_shape,
                                log_model=log_model)
    progress = ProgressCallback(fed.rounds, f"modality {cfg.method}", "modality-progress", postfix)
    print(f"modality: {cfg.method}, {data.num_clients} clients, {len(video)} with video "
          f"(missing rate {cfg.missing_rate}): {video}")
    run = run_rounds(plan, client_executor(params), checkpointer, [tracking, progress],
                     client_threads=fed.client_threads)
    plan.model.load_state_dict(run.state)
    return _finish(params, paths, tracker, plan.model, run.history, video, run.records)


def _finish(params: Params, paths: ModalityPaths, tracker: FederateTracker, model: AVModel,
            history: list[dict[str, float]], video: list[int],
            records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Model, metrics JSON, per-round TSV and plot; register the AV model and its audio branch (alias final)."""
    from fedcore.aggregation.state import to_cpu_state
    from fedcore.federation.checkpoint import save_state
    from fedcore.models.spec import audio_branch_spec
    from fedcore.multimodal import audio_branch
    from tasks.common import write_json, write_text
    from tasks.federate import rounds_tsv
    from tasks.modality import AUDIO_INPUTS, plot_av_rounds
    from tasks.orchestration import publish_markdown, publish_table
    from tasks.rounds import split_timings, timing_summary, write_run_record

    cfg = params.modality
    save_state(paths.model, to_cpu_state(model))
    last = history[-1]
    best = max(history, key=lambda row: row["audio_accuracy"])
    rows, timings = split_timings(history)
    tsv, png = paths.plots / "rounds.tsv", paths.plots / "rounds.png"
    write_text(tsv, rounds_tsv(rows, [c for c in ROUND_COLUMNS if any(c in row for row in rows)]))
    plot_av_rounds(rows, png, f"{cfg.method}, missing video {cfg.missing_rate:g}")
    final_round = int(last["round"])
    names = ("audio_accuracy", "audio_branch_accuracy", "av_accuracy", "zero_video_accuracy", "val_audio_accuracy",
             "val_av_accuracy")
    summary: dict[str, float] = {k: last[k] for k in names if k in last}
    teacher = tracker.finish(summary, final_round, [tsv, png])
    tag = {BRANCH_TAG: str(final_round)}
    branch_id = tracker.find_logged(BRANCH_TAG, str(final_round)) or tracker.log_model(
        audio_branch(model), f"audio-branch-round-{final_round:04d}", final_round, AUDIO_INPUTS, tags=tag,
        spec=audio_branch_spec(tracker.model_spec))
    student = tracker.register(branch_id, cfg.registered_audio)
    metrics = {
        "method": cfg.method, "missing_rate": cfg.missing_rate, "video_clients": video,
        **{k: round(v, 6) for k, v in summary.items()},
        "best_audio_accuracy": round(best["audio_accuracy"], 6), "best_round": int(best["round"]),
        "rounds": final_round,
        "rejected_updates": int(sum(row.get("num_rejected", 0.0) for row in rows)),
        "registered": {"teacher": f"models:/{cfg.registered_model}@final",
                       "audio_branch": f"models:/{cfg.registered_audio}@final"},
    }
    # What differs between two runs of the same inputs stays out of the DVC outputs (see tasks.rounds).
    record = {"stage": "modality", "mlflow_run_id": tracker.run_id, "teacher_version": teacher,
              "audio_branch_version": student, **timing_summary(timings), "round_timings": timings,
              "rejections": [{k: r[k] for k in ("round", "failed", "rejected")} for r in records if r["rejected"]]}
    write_run_record(paths.metrics, record)
    write_json(paths.metrics, metrics)
    publish_table([{c: round(row.get(c, float("nan")), 4) for c in ROUND_COLUMNS} for row in rows],
                          key="modality-rounds", description="per-round test accuracies")
    publish_markdown(
        f"# modality ({cfg.method}, missing video {cfg.missing_rate:g})\naudio-only test accuracy "
        f"**{last['audio_accuracy']:.4f}** after {final_round} rounds; MLflow run `{tracker.run_id}`; teacher "
        f"`{cfg.registered_model}@final`, audio branch `{cfg.registered_audio}@final`.", key="modality-summary")
    print(f"modality: {cfg.method} audio-only test accuracy {last['audio_accuracy']:.4f}"
          + (f", audio-visual {last['av_accuracy']:.4f}" if "av_accuracy" in last else "")
          + f"; metrics {paths.metrics}, plot {png}, MLflow run {tracker.run_id}")
    return {**metrics, **record}


_DEFAULTS = ModalityPaths()


def _main(
    command: Annotated[Literal["train", "av"], typer.Argument(
        metavar="COMMAND", help="train (the only command, kept for older command lines; the av stage is "
                                "python -m flows.av now)")] = "train",
    params: stage.ParamsFile = stage.PARAMS_FILE,
    features: stage.FeaturesDir = _DEFAULTS.features,
    partition: stage.PartitionFile = _DEFAULTS.partition,
    visual: stage.VisualDir = _DEFAULTS.visual,
    checkpoints: stage.CheckpointsDir = _DEFAULTS.checkpoints,
    model: Annotated[Path, typer.Option(metavar="FILE", help="the final audio-visual model "
                                                             "(safetensors)")] = _DEFAULTS.model,
    metrics: stage.MetricsFile = _DEFAULTS.metrics,
    plots: stage.PlotsDir = _DEFAULTS.plots,
) -> None:
    if command == "av":
        raise ValueError("modality: the av stage has a module of its own now. Fix: python -m flows.av --params ... "
                         "--features ... --visual ... [--manifest ...].")
    from tasks.common import read_params

    paths = ModalityPaths(features=features, partition=partition, visual=visual, checkpoints=checkpoints,
                          model=model, metrics=metrics, plots=plots, root=Path.cwd())
    modality(read_params(params), paths)


main = stage.command(__doc__, _main)
"""Command-line entry point (``python -m flows.modality``)."""
__getattr__ = FLOWS.module_getattr  # from flows.modality import modality_training: the flow, built then

if __name__ == "__main__":
    raise SystemExit(main())
