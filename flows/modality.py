"""av and modality stages: audio-visual data, then modality-wise federated training (fedcore.multimodal).

``python -m flows.modality av`` writes the visual store beside a feature store: each clip paired with a
handwritten digit image of its class (AV-MNIST style; scikit-learn's digits), or, with ``--manifest``, the visual
arrays of a user's AV manifest matched by row id. ``pairs.png`` shows one pair per class.

``python -m flows.modality train`` runs the method of ``modality.method`` (UniFL, MultiFL, Harmony, or
ModalityMirror's phase 1) over the partition's clients, of which a seeded draw (``modality.missing_rate``) keeps
the video. Every round: the clients train their phase's tasks, each parameter group is aggregated over the
clients that trained it (modality-wise), the model is scored on the test split (audio-only as the method serves
audio-only clients; audio-visual), logged to MLflow with ``step=round`` and its model, then checkpointed. A
killed run resumes from its last checkpoint. At the end the AV model is registered as
``modality.registered_model@final`` and its audio branch as ``modality.registered_audio@final``: the teacher and
the student the ``distill`` stage starts from (ModalityMirror phase 2).
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

from fedcore.aggregation.state import to_cpu_state
from fedcore.config import ModalityConfig, Params, flatten, to_dict
from fedcore.errors import QuorumError
from fedcore.federation.checkpoint import Checkpointer, file_digest, fingerprint, save_state
from fedcore.federation.sampling import round_rng, sample_clients
from fedcore.federation.schedules import learning_rate
from fedcore.models.spec import audio_branch_spec
from fedcore.multimodal import AVModel, ModalityAggregate, audio_branch, modality_wise
from fedcore.plans.supervised import build_aggregator
from flows import stage
from flows.runners import task_runner
from tasks.common import read_params, write_json, write_text
from tasks.federate import rounds_tsv
from tasks.modality import (
    evaluate_av,
    load_av_data,
    method_of,
    new_model,
    new_model_spec,
    plot_av_rounds,
    train_av_task,
    write_visual_store,
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

#: The inputs of the audio-visual model and of its audio branch, in call order (MLflow tag).
AV_INPUTS = ("audio", "visual")
AUDIO_INPUTS = ("audio",)
#: Tag of the logged audio branch: the round of the AV model it was cut from.
BRANCH_TAG = "fedaudio.audio_branch_of_round"
ROUND_COLUMNS = ("round", "phase", "audio_accuracy", "audio_branch_accuracy", "av_accuracy", "zero_video_accuracy",
                 "val_audio_accuracy", "val_av_accuracy", "train_loss_mean", "num_clients", "num_audio_clients",
                 "num_visual_clients", "num_rejected", "num_failed", "lr")


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


@flow(name="av", log_prints=True)
def pair_av(cfg: ModalityConfig, features_dir: Path, out_dir: Path, manifest: Path | None = None) -> dict[str, Any]:
    """Write the visual store of ``features_dir`` into ``out_dir`` (see the module docstring)."""
    summary = write_visual_store(features_dir, out_dir, cfg, manifest)
    print(f"av: {summary['rows']} visual examples {tuple(summary['visual_shape'])} from {summary['source']}; "
          f"examples in {out_dir / 'pairs.png'}")
    return summary


def client_threads(params: Params) -> tuple[int, int]:
    """(parallel clients, torch threads per client): the cores or ``max_workers``, and ``client_threads``.

    A client's thread count changes its arithmetic, so it is a param (``federation.client_threads``), not derived
    from the cores: the metrics are the same at any ``max_workers``.
    """
    cores = os.cpu_count() or 1
    workers = max(1, min(params.federation.max_workers or cores, params.partition.num_clients))
    return workers, params.federation.client_threads


def modality(params: Params, paths: ModalityPaths) -> dict[str, Any]:
    """Run the modality flow with the task runner of ``federation.runner`` (threads by default)."""
    workers, _ = client_threads(params)
    runner = task_runner(params.federation, workers)
    return modality_training.with_options(task_runner=runner)(params, paths)


def run_fingerprint(params: Params, digest: str) -> str:
    """Identity of a run: the sections that change its result, and the data."""
    return fingerprint({name: to_dict(getattr(params, name)) for name in
                        ("model", "federation", "aggregation", "modality", "partition")} | {"data": digest})


@flow(name="modality", log_prints=True)
def modality_training(params: Params, paths: ModalityPaths) -> dict[str, Any]:
    """Run (or resume) the audio-visual method's rounds; write the model, metrics, per-round table and plot."""
    fed, cfg = params.federation, params.modality
    data = load_av_data(paths.features, paths.partition, paths.visual, cfg)
    _, threads = client_threads(params)
    torch.set_num_threads(threads)
    method = method_of(params)
    schedule = method.schedule(fed.rounds, cfg.fusion_rounds)
    video = set(data.video)
    if idle := [p.name for _, p in schedule if not p.plan(False) and not video]:
        raise ValueError(f"modality: {cfg.method}'s phase {idle[0]!r} trains only clients with video, and none has "
                         f"video (missing_rate {cfg.missing_rate}). Fix: lower modality.missing_rate.")
    digest = file_digest([paths.features / "meta.json", paths.features / "index.csv", paths.partition,
                          paths.visual / "meta.json"])
    checkpointer = Checkpointer(paths.checkpoints, run_fingerprint(params, digest))
    aggregator = build_aggregator(params)
    model = new_model(params, data, fed.seed)
    history: list[dict[str, float]] = []
    rejections: list[dict[str, Any]] = []
    start_round, run_id = 0, None
    initial_state = to_cpu_state(model)  # round 0, and what a checkpoint must fit
    resumed, resume_reports = resume_from(checkpointer, "modality", reference=initial_state)
    if resumed is not None:
        start_round, global_state, _, meta = resumed
        history, run_id = list(meta["history"]), meta.get("mlflow_run_id")
        rejections = list(meta.get("rejections", []))
        sys.stderr.write(f"modality: resuming after round {start_round} of {fed.rounds} from {paths.checkpoints}\n")
    else:
        global_state = initial_state
    registry = dataclasses.replace(params.mlflow, registered_model=cfg.registered_model)
    tracker = FederateTracker(registry, paths.root, model_inputs=AV_INPUTS, model_spec=new_model_spec(params, data))
    run_id = tracker.start({**flatten(params), "modality.video_clients": sorted(video)}, resume_run_id=run_id,
                           run_name=f"modality-{cfg.method}")
    tracker.backfill(history)  # rounds of the checkpoint the MLflow run lacks
    if resume_reports:  # what the resume had to skip (damaged or mismatching files), also printed above
        tracker.log_record(f"resume/after_round_{start_round:04d}.json", {"reports": resume_reports})
    print(f"modality: {cfg.method}, {data.num_clients} clients, {len(video)} with video "
          f"(missing rate {cfg.missing_rate}): {sorted(video)}")
    try:
        with Progress(fed.rounds, f"modality {cfg.method}", key="modality-progress") as bar, \
                tempfile.TemporaryDirectory() as scratch:
            bar.update(start_round)
            for server_round in range(start_round + 1, fed.rounds + 1):
                started = time.perf_counter()
                number, phase = schedule[server_round - 1]
                sampled = sample_clients(data.num_clients, fed.client_fraction, fed.min_clients,
                                         round_rng(fed.seed, server_round))
                jobs = [(c, tasks) for c in sampled if (tasks := phase.plan(c in video))]
                futures = [(c, train_av_task.submit(params, data, c, server_round, global_state, tasks,
                                                    method.zero_fill, threads)) for c, tasks in jobs]
                updates, failed = gather_updates(futures)
                # a round whose sampled clients have nothing to train in this phase leaves the model as it is
                try:
                    result = (modality_wise(aggregator, global_state, updates, server_round, failed=failed,
                                            min_accepted=quorum_of(fed, len(jobs)))
                              if jobs else ModalityAggregate(global_state, {}))
                except QuorumError as error:
                    raise stop_on_quorum(error, "modality", paths.checkpoints, server_round - 1) from None
                rejections.append(rejection_record(server_round, failed, result.rejected))
                if rejections[-1]["rejected"]:
                    tracker.log_record(f"rejections/round_{server_round:04d}.json", rejections[-1])
                global_state = result.state
                model.load_state_dict(global_state)
                metrics = evaluate_av(model, method, data.test, fed.eval_batch_size)
                if data.val is not None:
                    metrics.update({f"val_{k}": v for k, v in
                                    evaluate_av(model, method, data.val, fed.eval_batch_size).items()})
                metrics.update(
                    phase=float(number),
                    train_loss_mean=sum(u.metrics["train_loss"] for u in updates) / max(1, len(updates)),
                    num_clients=float(len(jobs) - len(result.rejected)),
                    num_rejected=float(len(result.rejected)), num_failed=float(len(failed)),
                    num_audio_clients=float(len(result.participants.get("audio", []))),
                    num_visual_clients=float(len(result.participants.get("visual", []))),
                    lr=learning_rate(fed, server_round), round_seconds=time.perf_counter() - started)
                log_now = server_round % fed.log_model_every == 0 or server_round == fed.rounds
                weights = None
                if log_now:
                    weights = Path(scratch) / "weights.safetensors"
                    save_state(weights, global_state)
                tracker.log_round(server_round, metrics, model if log_now else None, data.audio_shape, weights)
                history.append({"round": float(server_round), **metrics})
                checkpointer.save(server_round, global_state, None, {"history": history, "mlflow_run_id": run_id,
                                                                     "rejections": rejections})
                bar.update(1, {"audio": f"{metrics['audio_accuracy']:.3f}", "phase": phase.name})
    except BaseException:
        tracker.fail()
        raise
    model.load_state_dict(global_state)
    return _finish(params, paths, tracker, model, history, sorted(video), rejections)


def _finish(params: Params, paths: ModalityPaths, tracker: FederateTracker, model: AVModel,
            history: list[dict[str, float]], video: list[int],
            rejections: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Model, metrics JSON, per-round TSV and plot; register the AV model and its audio branch (alias final)."""
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
              "rejections": [r for r in rejections or [] if r["rejected"]]}
    write_run_record(paths.metrics, record)
    write_json(paths.metrics, metrics)
    create_table_artifact([{c: round(row.get(c, float("nan")), 4) for c in ROUND_COLUMNS} for row in rows],
                          key="modality-rounds", description="per-round test accuracies")
    create_markdown_artifact(
        f"# modality ({cfg.method}, missing video {cfg.missing_rate:g})\naudio-only test accuracy "
        f"**{last['audio_accuracy']:.4f}** after {final_round} rounds; MLflow run `{tracker.run_id}`; teacher "
        f"`{cfg.registered_model}@final`, audio branch `{cfg.registered_audio}@final`.", key="modality-summary")
    print(f"modality: {cfg.method} audio-only test accuracy {last['audio_accuracy']:.4f}"
          + (f", audio-visual {last['av_accuracy']:.4f}" if "av_accuracy" in last else "")
          + f"; metrics {paths.metrics}, plot {png}, MLflow run {tracker.run_id}")
    return {**metrics, **record}


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", choices=["av", "train"])
    defaults = ModalityPaths()
    for name in ("features", "partition", "visual", "checkpoints", "model", "metrics", "plots"):
        p.add_argument(f"--{name}", type=Path, default=getattr(defaults, name))
    p.add_argument("--manifest", type=Path, default=None, help="av: an AV manifest CSV (default: digit images)")


def _main(args: argparse.Namespace) -> None:
    params = read_params(args.params)
    if args.command == "av":
        pair_av(params.modality, args.features, args.visual, args.manifest)
        return
    paths = ModalityPaths(features=args.features, partition=args.partition, visual=args.visual,
                          checkpoints=args.checkpoints, model=args.model, metrics=args.metrics, plots=args.plots,
                          root=Path.cwd())
    modality(params, paths)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m flows.modality``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
