"""Data tasks: ingest, featurise, partition, poison. Thin wrappers around fedcore.data; they own the file I/O.

Torch and torchaudio are imported by the tasks that use them, so the download and partition stages start without
them (about 3 s each).
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.config import DownloadConfig, FeaturesConfig, PartitionConfig, PoisonConfig, to_dict
from fedcore.data.audio import read_audio
from fedcore.data.datasets import ingest
from fedcore.data.download import resolve_mirror
from fedcore.data.manifest import read_manifest
from fedcore.data.partition import client_class_counts, make_partition
from fedcore.errors import DataError
from tasks.common import pyplot, read_json, save_figure, write_json, write_text
from tasks.orchestration import task
from tasks.progress import Progress

log = logging.getLogger(__name__)


@task(name="ingest-dataset")  # fetch() retries network errors itself, resuming
def ingest_dataset(cfg: DownloadConfig, out_dir: Path, downloads_dir: Path) -> dict[str, Any]:
    """Fetch (mirror first), extract safely, check every clip and write ``manifest.csv`` + ``report.json``.

    A mirror that is set (``download.mirror`` or env ``FEDAUDIO_MIRROR``) but missing is an error, not a silent
    fallback to the internet. Files refused (outside the dataset's folder, links, special files) or skipped (bad
    audio) are listed in ``report.json``; the returned summary also holds the run-specific ``url`` and ``source``.
    """
    mirror = resolve_mirror(cfg.mirror)
    bars: dict[str, Progress] = {}

    def progress(stage: str, done: int, total: int | None) -> None:
        if stage not in bars:
            bars[stage] = Progress(total or 0, stage, key=f"download-{stage}" if stage == "probe" else None)
        bars[stage].update(done - bars[stage].done)

    try:
        report = ingest(cfg, Path(out_dir), Path(downloads_dir), mirror=mirror, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    summary = report.to_dict()
    if summary.get("num_skipped"):
        log.warning(
            "Skipped %d unreadable audio files (listed in %s/report.json).", summary["num_skipped"], out_dir
        )
    if summary.get("num_refused"):
        log.warning(
            "Refused %d listed paths outside the dataset's folder, links or special files, never read (listed in "
            "%s/report.json).", summary["num_refused"], out_dir
        )
    return summary


@task(name="extract-features")
def featurise(cfg: FeaturesConfig, raw_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Log-mel of every manifest row, stored compactly with an index; stats from the train split only.

    One file is decoded at a time and reduced to its log-mel at once, so memory holds one decoded file (a
    10-minute file as much as a 1-second one only while it is read) plus the feature array. A file that cannot be
    read, holds NaN/Inf samples or overflows (e.g. a float WAV at 1e30) is skipped: its manifest path and reason go
    to ``meta.json``'s ``skipped`` list and to a warning. The store is byte-identical for the same manifest and
    settings, whatever the thread count; it holds no absolute path, time or run id.

    Raises
    ------
    DataError
        When the kept rows lack a train split, a test split or a second class; the message names the fix.
    """
    from fedcore.data.features import (
        LogMelExtractor,
        extract_clips,
        label_index,
        normalisation_stats,
        write_feature_store,
    )

    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    rows = read_manifest(raw_dir / "manifest.csv")
    if not rows:
        raise DataError(f"features: {raw_dir / 'manifest.csv'} lists no audio. Re-run the download stage.")
    _check_featurised(rows, [], len(rows))  # the manifest itself, before any file is read
    extractor = LogMelExtractor(cfg)
    need = len(rows) * int(np.prod(extractor.output_shape)) * np.dtype(cfg.dtype).itemsize
    if (memory := _memory_at_hand()) is not None and need > memory:
        raise DataError(f"features: the feature array must fit in the memory at hand ({memory / 2**30:.3g} GiB). "
                        f"Got {len(rows)} clips × {extractor.output_shape} × {cfg.dtype} = {need / 2**30:.3g} GiB. "
                        "Fix: lower features.clip_seconds or n_mels, keep features.dtype: float16, or ingest fewer "
                        "clips (download.max_per_class).")

    def load(i: int) -> tuple[np.ndarray, int]:
        return read_audio(raw_dir / rows[i].path)

    with Progress(len(rows), "features", key="features-progress") as bar:
        result = extract_clips(load, len(rows), extractor, dtype=cfg.dtype,
                               progress=lambda done, _total: bar.update(done - bar.done))
    kept = [rows[int(i)] for i in result.kept]
    skipped = [{"path": rows[i].path, "reason": _without_folder(reason, raw_dir)} for i, reason in result.skipped]
    _warn_skipped(skipped, out_dir)
    _check_featurised(kept, skipped, len(rows))
    names = label_index([row.label for row in kept])
    splits = np.array([row.split for row in kept])
    mean, std = normalisation_stats(result.features, np.flatnonzero(splits == "train"))
    lookup = {name: i for i, name in enumerate(names)}
    index_rows = [
        {"row": i, "id": r.id, "label": r.label, "label_idx": lookup[r.label], "speaker": r.speaker, "split": r.split}
        for i, r in enumerate(kept)
    ]
    write_feature_store(out_dir, result.features, index_rows, names, mean, std, to_dict(cfg), cfg.dtype, skipped)
    seconds = float(sum(r.duration for r in kept))
    cropped = _warn_cropped([r.duration for r in kept], cfg.clip_seconds)
    return {"num_samples": len(kept), "num_skipped": len(skipped), "audio_seconds": seconds,
            "cropped_share": cropped, "shape": list(extractor.output_shape), "mean": mean, "std": std,
            "labels": names}


CROP_WARN_SHARE = 0.5
"""The features stage warns when its crop discards more than this share of the audio."""


def _warn_cropped(durations: list[float], clip_seconds: float) -> float:
    """Warn, naming the param, when cropping to ``clip_seconds`` discards most of the audio; return the share."""
    from fedcore.data.features import cropped_share

    share = cropped_share(durations, clip_seconds)
    if share > CROP_WARN_SHARE:
        median = float(np.median(durations))
        log.warning("features: cropping every clip to features.clip_seconds = %g s discards %.0f%% of the audio "
                    "(the clips last %.3g s at the median). Fix: set features.clip_seconds (e.g. %.3g), or leave it "
                    "null for the dataset's own length.", clip_seconds, 100 * share, median, median)
    return share


def _without_folder(reason: str, folder: Path) -> str:
    """``reason`` with the raw folder's absolute and given spellings taken out, so meta.json holds no local path."""
    for prefix in sorted({str(folder.resolve()), str(folder.absolute()), str(folder)}, key=len, reverse=True):
        if prefix not in ("", "."):
            reason = reason.replace(prefix + "/", "")
    return reason


_WARN_AT_MOST = 10  # skipped files named one by one in the log; meta.json lists them all


def _warn_skipped(skipped: list[dict[str, str]], out_dir: Path) -> None:
    for entry in skipped[:_WARN_AT_MOST]:
        log.warning("features: skipped %s: %s", entry["path"], entry["reason"])
    if len(skipped) > _WARN_AT_MOST:
        log.warning("features: skipped %d more files (all listed in %s).", len(skipped) - _WARN_AT_MOST,
                    out_dir / "meta.json")


def _check_featurised(kept: list[Any], skipped: list[dict[str, str]], num_rows: int) -> None:
    """Refuse a store that no later stage can use: no train rows, no test rows, or fewer than two classes."""
    after = (f" after skipping {len(skipped)} of {num_rows} files (first: {skipped[0]['path']}: "
             f"{skipped[0]['reason']})" if skipped else "")
    train = [row for row in kept if row.split == "train"]
    test = [row for row in kept if row.split == "test"]
    classes = sorted({row.label for row in train})
    if not train:
        raise DataError(f"features: the dataset must have rows of split 'train'. Got none{after}. Fix: give the "
                        "manifest a 'train' split (download.test_fraction < 1, or a split column), or repair the "
                        "skipped files and re-run the download stage.")
    if not test:
        raise DataError(f"features: the dataset must have rows of split 'test'. Got none{after}. Fix: set "
                        "download.test_fraction > 0 (or a 'test' split in the manifest, download.test_fold for "
                        "esc50), or repair the skipped files, and re-run the download stage.")
    if len(classes) < 2:
        raise DataError(f"features: the training rows must hold at least two classes. Got {len(classes)} "
                        f"({', '.join(repr(c) for c in classes)}){after}. Fix: ingest a dataset with two or more "
                        "labels (download.dataset, download.manifest; download.max_per_class keeps every label), "
                        "or repair the skipped files and re-run the download stage.")


@task(name="partition-clients")
def partition_clients(cfg: PartitionConfig, features_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Split the training rows over clients; write the partition JSON, per-client stats and a heatmap."""
    index = _read_index(Path(features_dir) / "index.csv")
    meta = read_json(Path(features_dir) / "meta.json")
    labels = np.array([int(r["label_idx"]) for r in index], dtype=np.int64)
    groups = np.array([r["speaker"] for r in index])
    splits = np.array([r["split"] for r in index])
    train_rows = np.flatnonzero(splits == "train")
    test_rows = np.flatnonzero(splits == "test")
    num_classes = len(meta["labels"])
    # Sizes that cannot fit (rows, speakers, memory, disk) are refused here, before the first draw.
    partition = make_partition(labels, groups, train_rows, test_rows, cfg, num_classes,
                               memory_bytes=_memory_at_hand(), disk_bytes=_disk_at_hand(Path(out_dir)))
    out_dir = Path(out_dir)
    write_json(out_dir / "partition.json", partition)
    parts = [np.asarray(c["train"], dtype=np.int64) for c in partition["clients"]]
    holdouts = [np.asarray(c["holdout"], dtype=np.int64) for c in partition["clients"]]
    counts = client_class_counts(parts, labels, num_classes)
    _write_client_stats(out_dir / "client_stats.csv", counts, holdouts, meta["labels"])
    plot_heatmap(counts, meta["labels"], out_dir / "heatmap.png", title=f"{cfg.scheme} (α={cfg.alpha:g})")
    sizes = counts.sum(axis=1)
    return {"num_clients": len(parts), "min_client": int(sizes.min()), "max_client": int(sizes.max()),
            "num_train": int(sizes.sum()), "num_test": int(test_rows.size)}


@task(name="poison-clients")
def poison_clients(
    cfg: PoisonConfig, features: FeaturesConfig, raw_dir: Path, features_dir: Path, partition_file: Path,
    out_dir: Path,
) -> dict[str, Any]:
    """Attack a seeded fraction of clients; write the overlay and the ground truth (no copy of the dataset)."""
    from fedcore.data.poison import noisy_features, plan_poison
    from fedcore.data.store import FeatureStore

    store = FeatureStore.load(Path(features_dir))
    partition = read_json(partition_file)
    clients_rows = [np.asarray(c["train"], dtype=np.int64) for c in partition["clients"]]
    rng = np.random.default_rng(cfg.seed)
    plan = plan_poison(cfg, clients_rows, np.asarray(store.labels), store.label_names, rng)
    feature_rows = np.asarray(plan.noise_rows, dtype=np.int64)
    if feature_rows.size:  # a noise attack featurises clips again: torch only here
        import torch

        from fedcore.data.features import LogMelExtractor

        rows = read_manifest(Path(raw_dir) / "manifest.csv")
        by_id = {row.id: row for row in rows}
        extractor = LogMelExtractor(features)
        generator = torch.Generator().manual_seed(cfg.seed)

        def load(i: int) -> tuple[np.ndarray, int]:
            return read_audio(Path(raw_dir) / by_id[store.ids[i]].path)

        noisy = noisy_features(feature_rows, load, extractor, cfg.snr_db, generator)
        noisy = noisy.astype(store.features.dtype)
    else:
        noisy = np.zeros((0, *store.features.shape[1:]), dtype=store.features.dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "overlay.tmp.npz"
    np.savez_compressed(
        tmp, label_rows=np.asarray(plan.label_rows, dtype=np.int64), labels=np.asarray(plan.new_labels, np.int64),
        feature_rows=feature_rows, features=noisy,
    )
    tmp.replace(out_dir / "overlay.npz")
    truth = plan.to_ground_truth()
    write_json(out_dir / "ground_truth.json", truth)
    return {"attack": cfg.attack, "attacked_clients": list(plan.attacked_clients),
            "num_attacked_samples": int(truth.get("num_attacked_samples", 0))}


def _memory_at_hand() -> int | None:
    """Memory this process may still take, bytes: MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        available = None
    if available is None and hasattr(os, "sysconf"):
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            available = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            left = max(int(limit) - used, 0)
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return available


def _disk_at_hand(folder: Path) -> int | None:
    """Free bytes on the disk that will hold ``folder`` (its nearest existing parent); None if unknown."""
    target = folder.absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    try:
        return shutil.disk_usage(target).free
    except OSError:
        return None


def _read_index(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write_client_stats(path: Path, counts: np.ndarray, holdouts: list[np.ndarray], labels: list[str]) -> None:
    lines = ["client_id,num_train,num_holdout,num_classes_present," + ",".join(f"class_{n}" for n in labels)]
    for client, row in enumerate(counts):
        present = int((row > 0).sum())
        values = ",".join(str(int(v)) for v in row)
        lines.append(f"{client},{int(row.sum())},{len(holdouts[client])},{present},{values}")
    write_text(path, "\n".join(lines) + "\n")


def plot_heatmap(counts: np.ndarray, labels: list[str], path: Path, title: str = "") -> None:
    """Client × class heatmap of training-sample counts (PNG)."""
    plt = pyplot()

    num_clients, num_classes = counts.shape
    fig_w = min(2 + 0.45 * num_classes, 20)
    fig_h = min(1.5 + 0.32 * num_clients, 30)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
    image = ax.imshow(counts, aspect="auto", cmap="viridis")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_xticks(range(num_classes), labels=labels, rotation=90 if num_classes > 12 else 0)
    if num_clients <= 40:
        ax.set_yticks(range(num_clients))
    if num_clients * num_classes <= 400:
        for (i, j), value in np.ndenumerate(counts):
            ax.text(j, i, str(int(value)), ha="center", va="center", fontsize=7,
                    color="white" if value < counts.max() / 2 else "black")
    ax.set_title(f"Training samples per client and class {title}".strip())
    fig.colorbar(image, ax=ax, label="samples")
    save_figure(fig, path)
