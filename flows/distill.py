"""distill stage: federated knowledge distillation of a frozen teacher into a student (ModalityMirror phase 2).

Teacher and student are MLflow models named by URI (``distill.teacher``, ``distill.student``; e.g.
``models:/fedaudio-av@final`` and ``models:/fedaudio-av-audio@final``, which the modality stage registers), so the
stage serves any teacher → student use: the teacher is called with the inputs its ``fedaudio.inputs`` tag names
(audio alone by default), the student with audio. Only the clients that hold every input of the teacher take part
(for an audio-visual teacher: the clients with video). Each round they train the student with
``CE + λ·T²·KL(teacher ‖ student)``; the server combines the students (``federation.aggregator``); the student is
scored on the audio-only test split, logged to MLflow with ``step=round`` (round 0: the student before
distillation) and checkpointed. A killed run resumes to the same result. The last student is registered as
``distill.registered_model@final``.

The rounds are :class:`fedcore.plans.distill.DistillPlan` run by :func:`fedcore.federation.engine.run_rounds`
(clients as task runs of this flow, each on ``federation.client_threads`` threads; the server's work on every
core); this flow loads the models and the data, wires tracking and progress, and writes the outputs.
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

    from tasks.tracking import FederateTracker

ROUND_COLUMNS = ("round", "audio_accuracy", "val_audio_accuracy", "train_loss_mean", "train_accuracy_mean",
                 "teacher_accuracy_mean", "num_clients", "num_rejected", "num_failed", "lr")
FLOWS = stage.LazyFlows(__name__)


@dataclass(frozen=True)
class DistillPaths:
    """Inputs and outputs of the distill stage."""

    features: Path = Path("data/features")
    partition: Path = Path("data/partition/partition.json")
    visual: Path = Path("data/av")
    checkpoints: Path = Path("checkpoints/distill")
    model: Path = Path("models/student.safetensors")
    metrics: Path = Path("metrics/distill.json")
    plots: Path = Path("plots/distill")
    root: Path = Path(".")


def distill(params: Params, paths: DistillPaths) -> dict[str, Any]:
    """Run the distill flow with the task runner of ``execution.runner`` (threads by default)."""
    from flows.runners import stage_runner

    runner = stage_runner(params)
    return FLOWS["distillation"].with_options(task_runner=runner)(params, paths)


@FLOWS.flow("distillation", name="distill", log_prints=True)
def _distillation(params: Params, paths: DistillPaths) -> dict[str, Any]:
    """Run (or resume) the distillation rounds; write the student, metrics, per-round table and plot."""
    from fedcore.federation.checkpoint import Checkpointer, file_digest
    from fedcore.federation.engine import run_rounds
    from fedcore.plans.distill import DistillPlan, run_fingerprint
    from flows.runners import client_executor
    from tasks.modality import AUDIO_INPUTS, load_av_data
    from tasks.rounds import ProgressCallback, TrackingCallback
    from tasks.tracking import FederateTracker, load_logged_model, setup

    fed, cfg = params.federation, params.distill
    # The models first (before any data): rebuilt from their specs, no code from their files runs.
    setup(params.mlflow, paths.root)  # the store the URIs refer to
    teacher, teacher_inputs = load_logged_model(cfg.teacher, trust_pickle=params.mlflow.trust_pickle)
    student, student_inputs = load_logged_model(cfg.student, trust_pickle=params.mlflow.trust_pickle)
    data = load_av_data(paths.features, paths.partition, paths.visual, params.modality)
    plan = DistillPlan(params, data, student, student_inputs, teacher, teacher_inputs, name=cfg.student)
    digest = file_digest([paths.features / "meta.json", paths.partition, paths.visual / "meta.json"])
    checkpointer = Checkpointer(paths.checkpoints, run_fingerprint(params, digest))
    registry = dataclasses.replace(params.mlflow, registered_model=cfg.registered_model)
    tracker = FederateTracker(registry, paths.root, model_inputs=AUDIO_INPUTS)

    def log_model(server_round: int, row: Mapping[str, float]) -> bool:
        return True  # every round's student (round 0's too)

    def postfix(row: Mapping[str, float]) -> dict[str, object]:
        return {"audio": f"{row['audio_accuracy']:.3f}"}

    tracking = TrackingCallback(tracker, {**flatten(params), "distill.clients": plan.eligible}, run_name="distill",
                                model=student, input_shape=data.audio_shape, log_model=log_model)
    progress = ProgressCallback(cfg.rounds, "distill rounds", "distill-progress", postfix)
    print(f"distill: teacher {cfg.teacher} (inputs {', '.join(teacher_inputs)}) → student {cfg.student} on "
          f"{len(plan.eligible)} clients: {plan.eligible}")
    run = run_rounds(plan, client_executor(params), checkpointer, [tracking, progress],
                     client_threads=fed.client_threads)
    history = [{"round": 0.0, **run.initial}, *run.history] if run.initial else run.history
    return _finish(params, paths, tracker, run.state, history, plan.eligible, run.records)


def _finish(params: Params, paths: DistillPaths, tracker: FederateTracker, state: dict[str, torch.Tensor],
            history: list[dict[str, float]], clients: list[int],
            records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Student, metrics JSON, per-round TSV and plot; register the last student (alias final)."""
    from fedcore.federation.checkpoint import save_state
    from tasks.common import write_json, write_text
    from tasks.federate import rounds_tsv
    from tasks.modality import plot_av_rounds
    from tasks.orchestration import publish_markdown
    from tasks.rounds import split_timings, timing_summary, write_run_record

    cfg = params.distill
    save_state(paths.model, state)
    first, last = history[0], history[-1]
    rows, timings = split_timings(history)
    tsv, png = paths.plots / "rounds.tsv", paths.plots / "rounds.png"
    write_text(tsv, rounds_tsv(rows, [c for c in ROUND_COLUMNS if any(c in row for row in rows)]))
    plot_av_rounds(rows, png, f"distill {cfg.teacher} → {cfg.student}")
    final: dict[str, float] = {k: last[k] for k in ("audio_accuracy", "val_audio_accuracy") if k in last}
    version = tracker.finish(final, int(last["round"]), [tsv, png])
    metrics: dict[str, Any] = {
        "teacher": cfg.teacher, "student": cfg.student, "clients": clients,
        **{k: round(v, 6) for k, v in final.items()},
        "audio_accuracy_before": round(first["audio_accuracy"], 6) if first["round"] == 0 else None,
        "rounds": int(last["round"]), "registered": f"models:/{cfg.registered_model}@final",
        "rejected_updates": int(sum(r.get("num_rejected", 0.0) for r in history)),
    }
    # What differs between two runs of the same inputs stays out of the DVC outputs (see tasks.rounds).
    record = {"stage": "distill", "mlflow_run_id": tracker.run_id, "registered_version": version,
              **timing_summary(timings), "round_timings": timings,
              "rejections": [{k: r[k] for k in ("round", "failed", "rejected")} for r in records if r["rejected"]]}
    write_run_record(paths.metrics, record)
    write_json(paths.metrics, metrics)
    publish_markdown(
        f"# distill\nstudent audio-only test accuracy **{last['audio_accuracy']:.4f}** after {metrics['rounds']} "
        f"rounds (before: {first['audio_accuracy']:.4f}); registered `{cfg.registered_model}@final`.",
        key="distill-summary")
    print(f"distill: student audio-only test accuracy {first['audio_accuracy']:.4f} → {last['audio_accuracy']:.4f}; "
          f"metrics {paths.metrics}, MLflow run {tracker.run_id}")
    return {**metrics, **record}


_DEFAULTS = DistillPaths()


def _main(
    params: stage.ParamsFile = stage.PARAMS_FILE,
    features: stage.FeaturesDir = _DEFAULTS.features,
    partition: stage.PartitionFile = _DEFAULTS.partition,
    visual: stage.VisualDir = _DEFAULTS.visual,
    checkpoints: stage.CheckpointsDir = _DEFAULTS.checkpoints,
    model: Annotated[Path, typer.Option(metavar="FILE", help="the final student "
                                                             "(safetensors)")] = _DEFAULTS.model,
    metrics: stage.MetricsFile = _DEFAULTS.metrics,
    plots: stage.PlotsDir = _DEFAULTS.plots,
) -> None:
    from tasks.common import read_params

    distill(read_params(params), DistillPaths(features=features, partition=partition, visual=visual,
                                              checkpoints=checkpoints, model=model, metrics=metrics, plots=plots,
                                              root=Path.cwd()))


main = stage.command(__doc__, _main)
"""Command-line entry point (``python -m flows.distill``)."""
__getattr__ = FLOWS.module_getattr  # from flows.distill import distillation: the flow, built then

if __name__ == "__main__":
    raise SystemExit(main())
