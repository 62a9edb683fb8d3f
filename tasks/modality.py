"""What the audio-visual stages (av, modality, distill) read and write: the visual store, the clients' AV data, plots.

The visual store (``av`` stage) is a folder beside a feature store: ``visual.npy`` (one visual example per feature
store row, float32), ``pairs.csv`` (row id, label, split, source) and ``meta.json``. It comes either from the
AV-MNIST-style pairing of each clip with a handwritten digit image of its class (scikit-learn's digits, split
into disjoint image pools for the training and the test clips, and reduced to ``modality.visual_energy`` of their
PCA variance, fitted on the training pool; ``meta.json``'s ``pca`` records k and the share kept), or from a user's
AV manifest (:func:`fedcore.multimodal.data.read_av_manifest`), matched to the feature store by row id.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcore.config import ModalityConfig, Params
from fedcore.data.features import FeatureStore
from fedcore.models.spec import ModelSpec, av_model_spec
from fedcore.multimodal.data import (
    digit_images,
    keep_pca_energy,
    load_visual,
    pair_by_label,
    read_av_manifest,
    split_images,
    video_clients,
)
from fedcore.multimodal.models import AVModel
from fedcore.multimodal.train import AVClientData, AVData
from fedcore.plans.distill import AUDIO_INPUTS
from fedcore.plans.modality import AVSpec, new_av_model
from tasks.common import pyplot, read_json, save_figure, write_json, write_text

#: The inputs of the audio-visual model, in call order (an MLflow tag; an audio-only model's: AUDIO_INPUTS).
AV_INPUTS = ("audio", "visual")
__all__ = ["AUDIO_INPUTS", "AV_INPUTS", "AVData", "load_av_data", "new_model", "new_model_spec", "plot_av_rounds",
           "write_visual_store"]

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
        reduced = keep_pca_energy(images, train_pool, cfg.visual_energy)  # PCA of the train pool only
        visual = reduced.images[index]
        sources = [f"sklearn-digits:{i}" for i in index.tolist()]
        source = "scikit-learn digits (AV-MNIST-style pairing by label)"
        pca: dict[str, Any] | None = {"visual_energy": cfg.visual_energy, "pca_components": reduced.components,
                                      "pca_dims": reduced.dims, "pca_energy_kept": reduced.energy}
    else:
        rows = {row.id: row for row in read_av_manifest(manifest)}
        if missing := [i for i in store.ids if i not in rows]:
            raise ValueError(f"av: every feature-store row needs a visual in {str(manifest)!r}. Missing ids "
                             f"{missing[:5]!r} ({len(missing)} in all).")
        paths = [rows[i].visual_path for i in store.ids]
        visual = load_visual(paths)
        sources = [str(p) for p in paths]
        source = f"AV manifest {manifest}"
        pca = None  # a manifest's visuals are used as given (modality.visual_energy is for the digit images)
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
               "pair_seed": cfg.pair_seed, "image_test_fraction": cfg.image_test_fraction, "pca": pca}
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
    """The audio-visual model of ``params``, initial weights drawn from ``seed`` (what the modality stage trains)."""
    return new_av_model(AVSpec.of(params, data), seed)


def new_model_spec(params: Params, data: AVData) -> ModelSpec:
    """The architecture spec of :func:`new_model`'s model (what the stage's logged models carry)."""
    return av_model_spec(params.model, params.modality, data.audio_shape, data.visual_shape, data.num_classes)




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
