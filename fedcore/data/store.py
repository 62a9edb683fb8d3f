"""The on-disk feature store: writing it, reading it, its normalisation statistics (numpy only, no torch).

``features.npy`` (raw log-mel, float16 or float32), ``index.csv`` (:data:`INDEX_COLUMNS`) and ``meta.json``; see
docs/architecture.md, "Features". :meth:`FeatureStore.normalised` applies ``(x - mean) / std`` with the train
split's global statistics. The front end that fills it is :mod:`fedcore.data.features`; stages that only read the
store (partition, poison) import this module and never torch.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.errors import DataError

__all__ = [
    "INDEX_COLUMNS",
    "STORE_DTYPES",
    "FeatureStore",
    "cropped_share",
    "label_index",
    "normalisation_stats",
    "write_feature_store",
]

INDEX_COLUMNS = ("row", "id", "label", "label_idx", "speaker", "split")
"""Columns of ``index.csv``, in order."""

STORE_DTYPES = ("float16", "float32")
"""The dtypes the store keeps its features in."""

_STATS_CHUNK = 256  # rows per chunk in normalisation_stats: 256 x 64 x 101 float64 = 13 MB


def cropped_share(durations: Iterable[float], clip_seconds: float) -> float:
    """Share of the audio that cropping every clip to ``clip_seconds`` discards.

    ``sum_i max(0, d_i - clip_seconds) / sum_i d_i`` over the clips' durations ``d_i`` (seconds); 0.0 when there
    is no audio. Padding discards nothing, so clips shorter than ``clip_seconds`` count as kept whole.
    """
    values = [float(d) for d in durations]
    total = sum(values)
    if total <= 0.0:
        return 0.0
    return sum(max(0.0, d - clip_seconds) for d in values) / total


def normalisation_stats(features: np.ndarray, rows: np.ndarray) -> tuple[float, float]:
    """Global mean and (population) standard deviation over the given rows, in float64, chunk by chunk.

    Chunks are combined with the pairwise update of Chan, Golub and LeVeque (1979), so memory stays at one chunk
    and there is no catastrophic cancellation.

    Parameters
    ----------
    features : numpy.ndarray, shape (num_samples, n_mels, frames), float16 or float32
        Raw log-mel (a memory map works).
    rows : numpy.ndarray, shape (num_rows,), int
        Rows to use, normally the train split.

    Returns
    -------
    mean, std : float
    """
    rows = np.asarray(rows)
    if rows.ndim != 1 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"normalisation_stats: 'rows' must be a non-empty 1-D int array. Got {rows!r}.")
    if rows.min() < 0 or rows.max() >= len(features):
        raise ValueError(
            f"normalisation_stats: 'rows' must index features (0..{len(features) - 1}). "
            f"Got values in [{rows.min()}, {rows.max()}]."
        )
    rows = np.sort(rows)  # sequential reads from a memory map
    count, mean, m2 = 0, 0.0, 0.0
    for start in range(0, len(rows), _STATS_CHUNK):
        chunk = np.asarray(features[rows[start : start + _STATS_CHUNK]], dtype=np.float64)
        if not np.isfinite(chunk).all():
            raise DataError("normalisation_stats: 'features' must be finite. Got NaN or Inf in the given rows.")
        n_b = chunk.size
        mean_b = float(chunk.mean())
        m2_b = float(np.square(chunk - mean_b).sum())
        delta = mean_b - mean
        total = count + n_b
        mean += delta * n_b / total
        m2 += m2_b + delta * delta * count * n_b / total
        count = total
    std = math.sqrt(m2 / count)
    if std == 0.0:
        raise DataError(
            "normalisation_stats: 'std' must be > 0. Got 0.0: every feature value of the given rows is equal "
            "(silent audio?)."
        )
    return mean, std


# ------------------------------------------------------------------------------------------------------ store
def label_index(label_names_in_data: Iterable[str]) -> list[str]:
    """Sorted unique label names: natural order when every name is an integer ("2" < "10"), else lexicographic.

    Parameters
    ----------
    label_names_in_data : iterable of str
        Labels as they occur (duplicates allowed).

    Returns
    -------
    list of str
        ``label_idx`` of a sample is the position of its label in this list.
    """
    names = {str(name) for name in label_names_in_data}
    if names and all(re.fullmatch(r"[+-]?\d+", name) for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def _write_tmp(path: Path, write: Callable[[Any], None], mode: str) -> Path:
    """Write ``<path>.tmp`` and return it; the caller moves it in place with ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    kwargs: dict[str, Any] = {"newline": "", "encoding": "utf-8"} if "b" not in mode else {}
    with open(tmp, mode, **kwargs) as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    return tmp


def write_feature_store(
    folder: str | os.PathLike[str],
    features: np.ndarray,
    index_rows: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    mean: float,
    std: float,
    config_dict: Mapping[str, Any],
    dtype: str,
    skipped: Sequence[Mapping[str, Any]],
) -> Path:
    """Write ``features.npy``, ``index.csv`` and ``meta.json`` (docs/architecture.md, "Features").

    Every file goes to a temporary name first and is moved in place with ``os.replace`` once all three are
    written; ``meta.json`` is moved last.

    Parameters
    ----------
    folder : path
        Output folder (created).
    features : numpy.ndarray, shape (num_samples, n_mels, frames)
        Raw log-mel; row ``i`` belongs to ``index_rows[i]``.
    index_rows : sequence of mappings
        One per row, with keys ``id``, ``label``, ``speaker``, ``split`` (manifest rows).
    labels : sequence of str
        Label names in ``label_idx`` order (see :func:`label_index`); every row's label must be among them.
    mean, std : float
        Train-split statistics (see :func:`normalisation_stats`).
    config_dict : mapping
        The ``FeaturesConfig`` as a dict.
    dtype : {"float16", "float32"}
        Storage dtype of ``features.npy``.
    skipped : sequence of mappings
        Files left out, e.g. ``{"path": ..., "reason": ...}``.

    Returns
    -------
    pathlib.Path
        The folder.
    """
    if dtype not in STORE_DTYPES:
        raise ValueError(f"write_feature_store: 'dtype' must be one of {', '.join(STORE_DTYPES)}. Got {dtype!r}.")
    if features.ndim != 3:
        raise ValueError(
            f"write_feature_store: 'features' must be 3-D (num_samples, n_mels, frames). Got {features.shape}."
        )
    if len(index_rows) != len(features):
        raise ValueError(
            f"write_feature_store: 'index_rows' must have one row per feature row ({len(features)}). "
            f"Got {len(index_rows)}."
        )
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"write_feature_store: 'mean'/'std' must be finite with std > 0. Got {mean!r}/{std!r}.")
    label_names = [str(name) for name in labels]
    position = {name: i for i, name in enumerate(label_names)}
    if len(position) != len(label_names):
        raise ValueError(f"write_feature_store: 'labels' must be unique. Got {label_names!r}.")
    if missing := sorted({str(r["label"]) for r in index_rows} - set(position)):
        raise ValueError(f"write_feature_store: 'labels' must contain every row's label. Missing {missing!r}.")

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    stored = np.asarray(features, dtype=dtype)

    def write_csv(handle: Any) -> None:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(INDEX_COLUMNS)
        for i, r in enumerate(index_rows):
            label = str(r["label"])
            writer.writerow([i, r["id"], label, position[label], r["speaker"], r["split"]])

    meta = {
        "labels": label_names,
        "mean": float(mean),
        "std": float(std),
        "features": dict(config_dict),
        "num_samples": int(len(features)),
        "shape": [int(features.shape[1]), int(features.shape[2])],
        "skipped": [dict(s) for s in skipped],
    }
    tmp_files = [
        (_write_tmp(out / "features.npy", lambda h: np.save(h, stored), "wb"), out / "features.npy"),
        (_write_tmp(out / "index.csv", write_csv, "w"), out / "index.csv"),
        (_write_tmp(out / "meta.json", lambda h: json.dump(meta, h, indent=2), "w"), out / "meta.json"),
    ]
    for tmp, final in tmp_files:
        os.replace(tmp, final)
    return out


@dataclass
class FeatureStore:
    """Raw log-mel features with their index and metadata, as written by :func:`write_feature_store`.

    Attributes
    ----------
    features : numpy.ndarray, shape (num_samples, n_mels, frames), float16 or float32
        Raw log-mel (a read-only memory map when loaded with ``mmap=True``).
    ids : list of str
        Sample ids, one per row.
    labels : numpy.ndarray, shape (num_samples,), int64
        ``label_idx`` of every row.
    label_names : list of str
        Names in ``label_idx`` order.
    speakers : list of str
        Speaker or group id of every row.
    splits : numpy.ndarray, shape (num_samples,), str
        ``"train"`` or ``"test"`` per row.
    mean, std : float
        Train-split statistics used by :meth:`normalised`.
    meta : dict
        The whole ``meta.json``.
    """

    features: np.ndarray
    ids: list[str]
    labels: np.ndarray
    label_names: list[str]
    speakers: list[str]
    splits: np.ndarray
    mean: float
    std: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Number of rows."""
        return int(self.features.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of label names."""
        return len(self.label_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(1, n_mels, frames)``: the model input of one sample."""
        return 1, int(self.features.shape[1]), int(self.features.shape[2])

    @classmethod
    def load(cls, folder: str | os.PathLike[str], mmap: bool = True) -> FeatureStore:
        """Read a feature store folder.

        Parameters
        ----------
        folder : path
            Folder holding ``features.npy``, ``index.csv`` and ``meta.json``.
        mmap : bool, optional
            Memory-map ``features.npy`` read-only instead of reading it into memory.

        Raises
        ------
        DataError
            When a file is missing or the three files disagree.
        """
        root = Path(folder)
        for name in ("features.npy", "index.csv", "meta.json"):
            if not (root / name).is_file():
                raise DataError(f"FeatureStore: '{name}' must exist in {str(root)!r}. Run the features stage.")
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
        features = np.load(root / "features.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        with open(root / "index.csv", newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = tuple(next(reader, ()))
            records = list(reader)
        if header != INDEX_COLUMNS:
            raise DataError(f"FeatureStore: 'index.csv' header must be {','.join(INDEX_COLUMNS)}. Got {header!r}.")
        label_names = [str(name) for name in meta["labels"]]
        if len(records) != features.shape[0] or meta.get("num_samples") != features.shape[0]:
            raise DataError(
                f"FeatureStore: index.csv ({len(records)} rows), meta.json num_samples "
                f"({meta.get('num_samples')!r}) and features.npy ({features.shape[0]} rows) must agree."
            )
        for i, record in enumerate(records):
            try:
                consistent = len(record) == len(INDEX_COLUMNS) and int(record[0]) == i
                consistent = consistent and label_names[int(record[3])] == record[2]
            except (ValueError, IndexError):
                consistent = False
            if not consistent:
                raise DataError(
                    f"FeatureStore: index.csv row {i} must have row={i} and a label_idx naming its label. "
                    f"Got {record!r}."
                )
        return cls(
            features=features,
            ids=[r[1] for r in records],
            labels=np.array([int(r[3]) for r in records], dtype=np.int64),
            label_names=label_names,
            speakers=[r[4] for r in records],
            splits=np.array([r[5] for r in records], dtype=str),
            mean=float(meta["mean"]),
            std=float(meta["std"]),
            meta=meta,
        )

    def rows_of_split(self, name: str) -> np.ndarray:
        """Rows (int64, ascending) whose split is ``name`` (``"train"`` or ``"test"``)."""
        known = sorted({"train", "test", *self.splits.tolist()})
        if name not in known:
            raise ValueError(f"FeatureStore: 'name' must be one of {', '.join(known)}. Got {name!r}.")
        return np.flatnonzero(self.splits == name).astype(np.int64)

    def normalised(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Normalised features ``(x - mean) / std`` of the given rows, with a channel axis.

        Parameters
        ----------
        rows : numpy.ndarray, shape (num_rows,), int
            Feature-store rows, in the order wanted.

        Returns
        -------
        numpy.ndarray, shape (num_rows, 1, n_mels, frames), float32
        """
        index = np.asarray(rows, dtype=np.int64)
        raw = np.asarray(self.features[index], dtype=np.float32)
        return ((raw - np.float32(self.mean)) / np.float32(self.std))[:, None]
