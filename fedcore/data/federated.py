"""Assemble per-client tensors from the feature store, the partition and the poison overlay."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch

from fedcore.algorithms.base import ClientData
from fedcore.data.features import FeatureStore


@dataclass(frozen=True)
class Overlay:
    """Poisoned values that replace clean ones for the listed rows (training rows of attacked clients).

    Attributes
    ----------
    label_rows, labels : np.ndarray
        int64 ``(k,)``: row ``label_rows[i]`` gets label index ``labels[i]``.
    feature_rows : np.ndarray
        int64 ``(m,)`` rows whose raw log-mel is replaced.
    features : np.ndarray
        ``(m, n_mels, frames)`` raw (not normalised) log-mel, same dtype as the store.
    """

    label_rows: np.ndarray
    labels: np.ndarray
    feature_rows: np.ndarray
    features: np.ndarray

    @classmethod
    def empty(cls) -> Overlay:
        """An overlay that changes nothing."""
        none = np.zeros(0, dtype=np.int64)
        return cls(none, none, none, np.zeros((0, 1, 1), dtype=np.float32))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Overlay:
        """Build from the arrays of ``overlay.npz``."""
        return cls(
            np.asarray(arrays["label_rows"], dtype=np.int64),
            np.asarray(arrays["labels"], dtype=np.int64),
            np.asarray(arrays["feature_rows"], dtype=np.int64),
            np.asarray(arrays["features"]),
        )


class ClientRows(Sequence[Any]):
    """The clients' data, gathered on access from one shared normalised tensor (``rows[c]`` → ClientData).

    Memory holds each distinct row once, whatever the number of clients and however many of them share a row
    (``cross_device`` partitions); indexing a client copies only its own rows.

    Parameters
    ----------
    features : torch.Tensor
        ``(m, 1, n_mels, frames)`` float32, one entry per distinct row.
    labels : torch.Tensor
        ``(m,)`` int64.
    positions : sequence of numpy.ndarray
        Per client, int64 positions into ``features``.
    empty_is_none : bool
        Whether a client without rows reads as None (held-out splits) rather than as empty data.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, positions: Sequence[np.ndarray],
                 empty_is_none: bool) -> None:
        self._features = features
        self._labels = labels
        self._positions = list(positions)
        self._empty_is_none = empty_is_none

    def __len__(self) -> int:
        return len(self._positions)

    @overload
    def __getitem__(self, client: int) -> Any: ...

    @overload
    def __getitem__(self, client: slice) -> list[Any]: ...

    def __getitem__(self, client: int | slice) -> Any:
        """Client ``client``'s :class:`ClientData` (a new gathered copy), or None (see ``empty_is_none``)."""
        if isinstance(client, slice):
            return [self[c] for c in range(*client.indices(len(self)))]
        rows = self._positions[client]
        if self._empty_is_none and len(rows) == 0:
            return None
        index = torch.from_numpy(rows)
        return ClientData(self._features[index], self._labels[index])


@dataclass(frozen=True)
class FederatedDataset:
    """Everything the round loop needs, as tensors.

    Attributes
    ----------
    train : sequence of ClientData
        Per client (index = client id): its (possibly poisoned) training data, gathered on access.
    holdout : sequence of ClientData or None
        Per client: its clean held-out split, None when it has none (``holdout_fraction: 0`` or a tiny client).
    test : ClientData
        The global test split.
    num_classes : int
    input_shape : tuple of int
        ``(1, n_mels, frames)``.
    """

    train: Sequence[ClientData]
    holdout: Sequence[ClientData | None]
    test: ClientData
    num_classes: int
    input_shape: tuple[int, int, int]

    @property
    def num_clients(self) -> int:
        """Number of registered clients."""
        return len(self.train)


def build_federated_dataset(
    store: FeatureStore, partition: Mapping[str, Any], overlay: Overlay | None = None
) -> FederatedDataset:
    """Normalise features, apply the overlay to attacked training rows and index them per client.

    The overlay changes only the clients' *training* rows; held-out and test rows stay clean so that
    personalised and global accuracy measure the harm of the attack honestly. Each distinct training (and
    held-out) row is normalised once; clients hold positions into those tensors (:class:`ClientRows`).
    """
    overlay = overlay or Overlay.empty()
    labels = np.asarray(store.labels, dtype=np.int64).copy()
    if overlay.label_rows.size:
        labels[overlay.label_rows] = overlay.labels
    replaced = dict(zip(overlay.feature_rows.tolist(), range(overlay.feature_rows.size), strict=True))

    def tensors(rows: Any, poisoned: bool) -> ClientData:
        rows = np.asarray(rows, dtype=np.int64)
        features = store.normalised(rows)
        row_labels = labels[rows] if poisoned else np.asarray(store.labels, dtype=np.int64)[rows]
        if poisoned and replaced:
            for position, row in enumerate(rows.tolist()):
                if row in replaced:
                    raw = overlay.features[replaced[row]].astype(np.float32)
                    features[position, 0] = (raw - store.mean) / store.std
        return ClientData(torch.from_numpy(features), torch.from_numpy(row_labels.copy()))

    def per_client(key: str, poisoned: bool) -> ClientRows:
        rows = [np.asarray(client[key], dtype=np.int64) for client in partition["clients"]]
        distinct = np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)
        positions = [np.searchsorted(distinct, r) for r in rows]
        if distinct.size == 0:  # e.g. no held-out rows at all
            return ClientRows(torch.zeros(0), torch.zeros(0, dtype=torch.int64), positions, empty_is_none=True)
        shared = tensors(distinct, poisoned)
        return ClientRows(shared.features, shared.labels, positions, empty_is_none=not poisoned)

    n_mels, frames = store.features.shape[1:]
    return FederatedDataset(per_client("train", poisoned=True), per_client("holdout", poisoned=False),
                            tensors(partition["test"], poisoned=False), len(store.label_names),
                            (1, int(n_mels), int(frames)))


def load_federated_data(features_dir: Path, partition_file: Path, poison_dir: Path | None = None) -> FederatedDataset:
    """Feature store + partition (JSON) + poison overlay (``<poison_dir>/overlay.npz``, if any) -> client rows."""
    store = FeatureStore.load(Path(features_dir), mmap=True)
    partition = json.loads(Path(partition_file).read_text())
    overlay = None
    if poison_dir is not None and (Path(poison_dir) / "overlay.npz").exists():
        with np.load(Path(poison_dir) / "overlay.npz") as arrays:
            overlay = Overlay.from_arrays(arrays)
    return build_federated_dataset(store, partition, overlay)
