"""distill stage: federated knowledge distillation of a frozen teacher into a student (ModalityMirror phase 2).

Teacher and student are MLflow models named by URI (``distill.teacher``, ``distill.student``; e.g.
``models:/fedaudio-av@final`` and ``models:/fedaudio-av-audio@final``, which the modality stage registers), so the
stage serves any teacher → student use: the teacher is called with the inputs its ``fedaudio.inputs`` tag names
(audio alone by default), the student with audio. Only the clients that hold every input of the teacher take part
(for an audio-visual teacher: the clients with video). Each round they train the student with
``CE + λ·T²·KL(teacher ‖ student)``; the server averages the students (``federation.aggregator``); the student is
scored on the audio-only test split, logged to MLflow with ``step=round`` (round 0: the student before
distillation) and checkpointed. A killed run resumes. The last student is registered as
``distill.registered_model@final``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from fedcore.aggregation.state import to_cpu_state
from fedcore.config import Params, flatten, to_dict
from fedcore.errors import QuorumError
from fedcore.federation.checkpoint import Checkpointer, file_digest, fingerprint, save_state
from fedcore.federation.sampling import round_rng, sample_clients
from fedcore.models.spec import spec_of
from fedcore.plans.supervised import build_aggregator
from flows import stage
from flows.modality import AUDIO_INPUTS, client_threads
from flows.runners import task_runner
from tasks.common import read_params, write_json, write_text
from tasks.federate import rounds_tsv
from tasks.modality import distill_task, evaluate_student, load_av_data, local_settings, plot_av_rounds
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
from tasks.tracking import FederateTracker, load_logged_model, setup

ROUND_COLUMNS = ("round", "audio_accuracy", "val_audio_accuracy", "train_loss_mean", "train_accuracy_mean",
                 "teacher_accuracy_mean", "num_clients", "num_rejected", "num_failed", "lr")


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
    """Run the distill flow with the task runner of ``federation.runner`` (threads by default)."""
    workers, _ = client_threads(params)
    runner = task_runner(params.federation, workers)
    return distillation.with_options(task_runner=runner)(params, paths)


@flow(name="distill", log_prints=True)
def distillation(params: Params, paths: DistillPaths) -> dict[str, Any]:
    """Run (or resume) the distillation rounds; write the student, metrics, per-round table and plot."""
    fed, cfg = params.federation, params.distill
    # The models first (before any data): rebuilt from their specs, no code from their files runs.
    setup(params.mlflow, paths.root)  # the store the URIs refer to
    teacher, teacher_inputs = load_logged_model(cfg.teacher, trust_pickle=params.mlflow.trust_pickle)
    student, student_inputs = load_logged_model(cfg.student, trust_pickle=params.mlflow.trust_pickle)
    data = load_av_data(paths.features, paths.partition, paths.visual, params.modality)
    _, threads = client_threads(params)
    torch.set_num_threads(threads)
    if not isinstance(student, torch.nn.Module) or not any(p.requires_grad for p in student.parameters()):
        raise ValueError(f"distill: the student {cfg.student!r} must load as a trainable torch nn.Module (a model "
                         "logged by this project's stages, as the modality stage logs its audio branch). Got "
                         f"{type(student).__name__}.")
    if tuple(student_inputs) != AUDIO_INPUTS:
        raise ValueError(f"distill: the student must take audio alone. {cfg.student!r} takes {student_inputs!r}.")
    if spec_of(student) is None:  # e.g. a pickled model loaded under mlflow.trust_pickle: no spec to log it with
        raise ValueError(f"distill: the student {cfg.student!r} must carry an architecture spec (model_spec.json), "
                         "since every round's student is logged as spec + safetensors. Got a model without one. "
                         "Fix: start from a model logged by this project's stages (e.g. the modality stage's "
                         "audio branch).")
    if isinstance(teacher, torch.nn.Module):
        teacher.eval()
    eligible = data.video if "visual" in teacher_inputs else list(range(data.num_clients))
    if not eligible:
        raise ValueError(f"distill: no client holds every input of the teacher ({', '.join(teacher_inputs)}). "
                         "Fix: lower modality.missing_rate.")
    digest = file_digest([paths.features / "meta.json", paths.partition, paths.visual / "meta.json"])
    key = {name: to_dict(getattr(params, name)) for name in ("federation", "aggregation", "distill", "modality")}
    checkpointer = Checkpointer(paths.checkpoints, fingerprint({**key, "data": digest}))
    aggregator = build_aggregator(params)
    history: list[dict[str, float]] = []
    rejections: list[dict[str, Any]] = []
    run_id = None
    initial_state = to_cpu_state(student)  # round 0, and what a checkpoint must fit
    resumed, resume_reports = resume_from(checkpointer, "distill", reference=initial_state)
    if resumed is not None:
        start_round, state, _, meta = resumed
        history, run_id = list(meta["history"]), meta.get("mlflow_run_id")
        rejections = list(meta.get("rejections", []))
        sys.stderr.write(f"distill: resuming after round {start_round} of {cfg.rounds} from {paths.checkpoints}\n")
    else:
        start_round, state = 0, initial_state
    registry = dataclasses.replace(params.mlflow, registered_model=cfg.registered_model)
    tracker = FederateTracker(registry, paths.root, model_inputs=AUDIO_INPUTS)
    run_id = tracker.start({**flatten(params), "distill.clients": eligible}, resume_run_id=run_id,
                           run_name="distill")
    tracker.backfill(history)  # rounds of the checkpoint the MLflow run lacks
    if resume_reports:  # what the resume had to skip (damaged or mismatching files), also printed above
        tracker.log_record(f"resume/after_round_{start_round:04d}.json", {"reports": resume_reports})

    def evaluate(weights: dict[str, torch.Tensor]) -> dict[str, float]:
        scores = evaluate_student(_loaded(student, weights), data.test, fed.eval_batch_size)
        if data.val is not None:
            scores["val_audio_accuracy"] = evaluate_student(student, data.val, fed.eval_batch_size)["audio_accuracy"]
        return scores

    print(f"distill: teacher {cfg.teacher} (inputs {', '.join(teacher_inputs)}) → student {cfg.student} on "
          f"{len(eligible)} clients: {eligible}")
    try:
        with Progress(cfg.rounds, "distill rounds", key="distill-progress") as bar, \
                tempfile.TemporaryDirectory() as scratch:
            if resumed is None:  # the student before distillation: round 0
                floor = {**evaluate(state), "round_seconds": 0.0}
                tracker.log_round(0, floor, _loaded(student, state), data.audio_shape)
                history.append({"round": 0.0, **floor})
            bar.update(start_round)
            for server_round in range(start_round + 1, cfg.rounds + 1):
                started = time.perf_counter()
                picked = sample_clients(len(eligible), fed.client_fraction, fed.min_clients,
                                        round_rng(fed.seed, server_round))
                futures = [(eligible[i], distill_task.submit(params, data, eligible[i], server_round, student,
                                                             state, teacher, teacher_inputs, threads))
                           for i in picked]
                updates, failed = gather_updates(futures)
                try:
                    result = aggregator.aggregate(state, updates, server_round, failed=failed,
                                                  min_accepted=quorum_of(fed, len(picked)))
                except QuorumError as error:
                    raise stop_on_quorum(error, "distill", paths.checkpoints, server_round - 1) from None
                rejections.append(rejection_record(server_round, failed, result.rejected))
                if rejections[-1]["rejected"]:
                    tracker.log_record(f"rejections/round_{server_round:04d}.json", rejections[-1])
                state = {**state, **result.state}
                metrics = evaluate(state)
                kept = [u for u in updates if u.client_id not in result.rejected]
                for name in ("train_loss", "train_accuracy", "teacher_accuracy"):
                    metrics[f"{name}_mean"] = sum(u.metrics[name] for u in kept) / len(kept)
                metrics.update(num_clients=float(len(kept)), num_rejected=float(len(result.rejected)),
                               num_failed=float(len(failed)),
                               lr=local_settings(params, server_round, cfg.lr).lr,
                               round_seconds=time.perf_counter() - started)
                weights = Path(scratch) / "weights.safetensors"
                save_state(weights, state)
                tracker.log_round(server_round, metrics, _loaded(student, state), data.audio_shape, weights)
                history.append({"round": float(server_round), **metrics})
                checkpointer.save(server_round, state, None, {"history": history, "mlflow_run_id": run_id,
                                                             "rejections": rejections})
                bar.update(1, {"audio": f"{metrics['audio_accuracy']:.3f}"})
    except BaseException:
        tracker.fail()
        raise
    return _finish(params, paths, tracker, state, history, eligible, rejections)


def _loaded(student: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``student`` with ``state`` loaded (the template instance; only the flow's thread calls this)."""
    student.load_state_dict(state)
    return student


def _finish(params: Params, paths: DistillPaths, tracker: FederateTracker, state: dict[str, torch.Tensor],
            history: list[dict[str, float]], clients: list[int],
            rejections: list[dict[str, Any]] | None = None) -> dict[str, Any]:
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
              "rejections": [r for r in rejections or [] if r["rejected"]]}
    write_run_record(paths.metrics, record)
    write_json(paths.metrics, metrics)
    create_markdown_artifact(
        f"# distill\nstudent audio-only test accuracy **{last['audio_accuracy']:.4f}** after {metrics['rounds']} "
        f"rounds (before: {first['audio_accuracy']:.4f}); registered `{cfg.registered_model}@final`.",
        key="distill-summary")
    print(f"distill: student audio-only test accuracy {first['audio_accuracy']:.4f} → {last['audio_accuracy']:.4f}; "
          f"metrics {paths.metrics}, MLflow run {tracker.run_id}")
    return {**metrics, **record}


def _arguments(p: argparse.ArgumentParser) -> None:
    defaults = DistillPaths()
    for name in ("features", "partition", "visual", "checkpoints", "model", "metrics", "plots"):
        p.add_argument(f"--{name}", type=Path, default=getattr(defaults, name))


def _main(args: argparse.Namespace) -> None:
    params = read_params(args.params)
    distill(params, DistillPaths(features=args.features, partition=args.partition, visual=args.visual,
                                 checkpoints=args.checkpoints, model=args.model, metrics=args.metrics,
                                 plots=args.plots, root=Path.cwd()))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m flows.distill``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
