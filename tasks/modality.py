"""Tasks of the audio-visual stages: the visual store, the clients' AV data, client training, evaluation, plots.

The visual store (``av`` stage) is a folder beside a feature store: ``visual.npy`` (one visual example per feature
store row, float32), ``pairs.csv`` (row id, label, split, source) and ``meta.json``. It comes either from the
AV-MNIST-style pairing of each clip with a handwritten digit image of its class (scikit-learn's digits, split
into disjoint image pools for the training and the test clips), or from a user's AV manifest
(:func:`fedcore.multimodal.data.read_av_manifest`), matched to the feature store by row id.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict
from fedcore.algorithms.base import LocalSettings
from fedcore.config import ModalityConfig, Params, to_dict
from fedcore.data.features import FeatureStore
from fedcore.federation.checkpoint import fingerprint
from fedcore.federation.sampling import client_generator
from fedcore.federation.schedules import learning_rate
from fedcore.models.spec import ModelSpec, av_model_spec
from fedcore.multimodal import AV_METHODS, AVClientData, AVMethod, AVModel, build_av_model, train_av_client
from fedcore.multimodal.data import (
    digit_images,
    load_visual,
    pair_by_label,
    read_av_manifest,
    split_images,
    video_clients,
)
from fedcore.multimodal.train import accuracy, train_student
from tasks.common import pyplot, read_json, save_figure, write_json, write_text

VISUAL_FILE = "visual.npy"


# --------------------------------------------------------------------------------------------------- visual store
def write_visual_store(features_dir: Path, out_dir: Path, cfg: ModalityConfig,
                       manifest: Path | None = None) -> dict[str, Any]:
    """Write the visual store of the feature store in ``features_dir`` into ``out_dir``; return its summary."""
    store = FeatureStore.load(features_dir, mmap=True)
    labels = [store.label_names[int(i)] for i in store.labels]
    splits = [str(s) for s in store.splits]
    if manifest is None:
        images, image_labels = digit_images()
        train_pool, test_pool = split_images(image_labels, cfg.image_test_fraction, cfg.pair_seed)
        index = pair_by_label(labels, splits, image_labels, {"train": train_pool, "test": test_pool},
                              cfg.pair_seed)
        visual = images[index]
        sources = [f"sklearn-digits:{i}" for i in index.tolist()]
        source = "scikit-learn digits (AV-MNIST-style pairing by label)"
    else:
        rows = {row.id: row for row in read_av_manifest(manifest)}
        if missing := [i for i in store.ids if i not in rows]:
            raise ValueError(f"av: every feature-store row needs a visual in {str(manifest)!r}. Missing ids "
                             f"{missing[:5]!r} ({len(missing)} in all).")
        paths = [rows[i].visual_path for i in store.ids]
        visual = load_visual(paths)
        sources = [str(p) for p in paths]
        source = f"AV manifest {manifest}"
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (VISUAL_FILE + ".tmp.npy")
    np.save(tmp, visual.astype(np.float32))
    tmp.replace(out_dir / VISUAL_FILE)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "label", "split", "visual"])
    writer.writerows(zip(store.ids, labels, splits, sources, strict=True))
    write_text(out_dir / "pairs.csv", buffer.getvalue())
    summary = {"rows": int(visual.shape[0]), "visual_shape": list(visual.shape[1:]), "source": source,
               "pair_seed": cfg.pair_seed, "image_test_fraction": cfg.image_test_fraction}
    write_json(out_dir / "meta.json", summary)
    plot_pairs(store, visual, labels, out_dir / "pairs.png")
    return summary


def plot_pairs(store: FeatureStore, visual: np.ndarray, labels: Sequence[str], path: Path) -> None:
    """One training pair per class: the clip's log-mel above its paired image."""
    plt = pyplot()
    names = sorted(set(labels))[:10]
    fig, axes = plt.subplots(2, len(names), figsize=(1.3 * len(names), 3.0), dpi=100, squeeze=False)
    for column, name in enumerate(names):
        row = next(i for i, label in enumerate(labels) if label == name)
        axes[0][column].imshow(np.asarray(store.features[row], dtype=np.float32), origin="lower", aspect="auto")
        image = visual[row]
        image = image.mean(axis=0) if image.ndim == 4 else image  # frames: their mean
        axes[1][column].imshow(image.transpose(1, 2, 0).squeeze(-1) if image.shape[0] == 1
                               else image.transpose(1, 2, 0), cmap="gray")
        axes[0][column].set_title(name, fontsize=8)
        for ax in (axes[0][column], axes[1][column]):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_ylabel("log-mel", fontsize=8)
    axes[1][0].set_ylabel("visual", fontsize=8)
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------------- client data
@dataclass(frozen=True)
class AVData:
    """The clients' audio-visual training data, the validation and test splits, as tensors.

    ``val`` pools the clients' held-out rows (``partition.holdout_fraction``; None when there are none): the split
    hyperparameters are chosen on, while ``test`` only reports.
    """

    train: list[AVClientData]
    test: AVClientData
    num_classes: int
    audio_shape: tuple[int, int, int]
    visual_shape: tuple[int, ...]
    video: list[int]
    val: AVClientData | None = None

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.train)


def load_av_data(features_dir: Path, partition_file: Path, visual_dir: Path, cfg: ModalityConfig) -> AVData:
    """Per-client tensors (clients without video get ``visual=None``) and the test split with its visuals."""
    store = FeatureStore.load(features_dir, mmap=True)
    visual = np.load(visual_dir / VISUAL_FILE, mmap_mode="r")
    if visual.shape[0] != store.num_samples:
        raise ValueError(f"av: the visual store {str(visual_dir)!r} has {visual.shape[0]} rows; the feature store "
                         f"{str(features_dir)!r} has {store.num_samples}. Fix: rerun the av stage.")
    partition = read_json(partition_file)
    clients = partition["clients"]
    video = video_clients(len(clients), cfg.missing_rate, cfg.seed, cfg.draw)
    has_video = set(video)

    def tensors(rows: Sequence[int], with_video: bool) -> AVClientData:
        index = np.asarray(rows, dtype=np.int64)
        audio = torch.from_numpy(store.normalised(index))
        labels = torch.from_numpy(np.asarray(store.labels, dtype=np.int64)[index].copy())
        images = torch.from_numpy(np.ascontiguousarray(visual[index], dtype=np.float32)) if with_video else None
        return AVClientData(audio, images, labels)

    train = [tensors(client["train"], c in has_video) for c, client in enumerate(clients)]
    held_out = [row for client in clients for row in client["holdout"]]
    n_mels, frames = store.features.shape[1:]
    return AVData(train, tensors(partition["test"], True), len(store.label_names), (1, int(n_mels), int(frames)),
                  tuple(int(s) for s in visual.shape[1:]), video, tensors(held_out, True) if held_out else None)


# --------------------------------------------------------------------------------------------------- models
def new_model(params: Params, data: AVData, seed: int) -> AVModel:
    """The audio-visual model of ``params`` with initial weights drawn from ``seed``."""
    cfg = params.modality
    return build_av_model(audio_cfg=params.model, audio_shape=data.audio_shape, visual_shape=data.visual_shape,
                          num_classes=data.num_classes, fusion=cfg.fusion, embed_dim=cfg.embed_dim,
                          hidden_dim=cfg.hidden_dim, visual_width=cfg.visual_width, dropout=cfg.dropout,
                          generator=torch.Generator().manual_seed(seed))


def new_model_spec(params: Params, data: AVData) -> ModelSpec:
    """The architecture spec of :func:`new_model`'s model (what the stage's logged models carry)."""
    return av_model_spec(params.model, params.modality, data.audio_shape, data.visual_shape, data.num_classes)


def method_of(params: Params) -> AVMethod:
    """The registered method of ``modality.method``."""
    return AV_METHODS.build(params.modality.method)


_local = threading.local()


def _worker_model(params: Params, data: AVData) -> AVModel:
    """One model per worker thread, reused (its weights are overwritten by every client)."""
    model: AVModel | None = getattr(_local, "model", None)
    key = fingerprint({"model": to_dict(params.model), "modality": to_dict(params.modality),
                       "shapes": [data.audio_shape, data.visual_shape, data.num_classes]})
    if model is None or getattr(_local, "key", None) != key:
        model = _local.model = new_model(params, data, 0)
        _local.key = key
    return model


def local_settings(params: Params, server_round: int, lr: float | None = None) -> LocalSettings:
    """Local SGD settings of ``server_round`` (``lr`` replaces the schedule's when given)."""
    fed = params.federation
    return LocalSettings(epochs=fed.local_epochs, batch_size=fed.batch_size,
                         lr=learning_rate(fed, server_round) if lr is None else lr, momentum=fed.momentum,
                         weight_decay=fed.weight_decay)


@task(name="train-av-client", cache_policy=NO_CACHE, retries=1)
def train_av_task(params: Params, data: AVData, client_id: int, server_round: int, global_state: StateDict,
                  tasks: Sequence[str], zero_fill: bool, threads: int) -> ClientUpdate:
    """One client's round of the audio-visual method (its tasks on its data; only trained groups are sent)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return train_av_client(client_id=client_id, model=_worker_model(params, data), global_state=global_state,
                           data=data.train[client_id], tasks=tasks, settings=local_settings(params, server_round),
                           generator=client_generator(params.federation.seed, server_round, client_id),
                           zero_fill=zero_fill)


@task(name="distill-client", cache_policy=NO_CACHE, retries=1)
def distill_task(params: Params, data: AVData, client_id: int, server_round: int, student: torch.nn.Module,
                 student_state: StateDict, teacher: Any, teacher_inputs: Sequence[str],
                 threads: int) -> ClientUpdate:
    """One client's distillation round, on this worker thread's own copy of ``student`` (the template)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if getattr(_local, "template", None) is not student:
        _local.template, _local.student = student, copy.deepcopy(student)
    cfg = params.distill
    return train_student(client_id=client_id, student=_local.student, student_state=student_state, teacher=teacher,
                         teacher_inputs=teacher_inputs, data=data.train[client_id],
                         settings=local_settings(params, server_round, cfg.lr),
                         generator=client_generator(params.federation.seed, server_round, client_id),
                         lambd=cfg.lambd, temperature=cfg.temperature)


# --------------------------------------------------------------------------------------------------- evaluation
def evaluate_av(model: AVModel, method: AVMethod, test: AVClientData, batch_size: int) -> dict[str, float]:
    """Test accuracies on the test split.

    ``audio_accuracy`` (audio only, as the method serves audio-only clients), ``audio_branch_accuracy``, and for
    methods with a fused model ``av_accuracy`` and ``zero_video_accuracy``. Each encoder runs once per batch (the
    three audio scores share the audio embedding), on every core (no client trains meanwhile).
    """
    assert test.visual is not None
    model.eval()
    correct = {"audio_branch_accuracy": 0, "av_accuracy": 0, "zero_video_accuracy": 0}
    with all_cores(), torch.no_grad():
        zero = model.visual(torch.zeros((1, *model.visual_shape), dtype=test.audio.dtype))
        for start in range(0, len(test), batch_size):
            rows = slice(start, start + batch_size)
            labels = test.labels[rows]
            audio = model.audio(test.audio[rows])
            outputs = {"audio_branch_accuracy": model.audio_head(audio)}
            if method.fused:
                outputs["av_accuracy"] = model.fusion(audio, model.visual(test.visual[rows]))
                outputs["zero_video_accuracy"] = model.fusion(audio, zero.expand(audio.shape[0], -1))
            for name, logits in outputs.items():
                correct[name] += int((logits.argmax(dim=1) == labels).sum())
    names = ["audio_branch_accuracy", *(["av_accuracy", "zero_video_accuracy"] if method.fused else [])]
    scores = {name: correct[name] / len(test) for name in names}
    served = {"branch": "audio_branch_accuracy", "zero_video": "zero_video_accuracy"}[method.audio_eval]
    scores["audio_accuracy"] = scores[served]
    return scores


def evaluate_student(student: Any, test: AVClientData, batch_size: int) -> dict[str, float]:
    """``audio_accuracy`` of an audio model on the test split."""
    if isinstance(student, torch.nn.Module):
        student.eval()
    with all_cores():
        return {"audio_accuracy": accuracy(lambda r: student(test.audio[r]), test.labels, batch_size)}


@contextlib.contextmanager
def all_cores() -> Iterator[None]:
    """Torch on every core for the block (evaluation between rounds, when no client trains)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def plot_av_rounds(history: Sequence[dict[str, float]], path: Path, title: str) -> None:
    """Test accuracies per round (audio-only as served, audio branch, audio-visual, zero video)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    rounds = [row["round"] for row in history]
    styles = {"audio_accuracy": ("audio-only (as served)", "tab:blue", "-"),
              "audio_branch_accuracy": ("audio branch", "tab:cyan", ":"),
              "av_accuracy": ("audio-visual", "tab:green", "-"),
              "zero_video_accuracy": ("AV model, zero video", "tab:orange", "--"),
              "teacher_accuracy_mean": ("teacher (train batches)", "tab:gray", ":")}
    for key, (label, color, style) in styles.items():
        if any(key in row for row in history):
            ax.plot(rounds, [row.get(key, float("nan")) for row in history], style, color=color, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
