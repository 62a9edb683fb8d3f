"""Pool several feature stores into one: the unlabelled pretraining audio of federated SSL (FASSL)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedcore.data.features import FeatureStore, write_feature_store


def pool_feature_stores(stores: Mapping[str, FeatureStore], folder: str | os.PathLike[str]) -> Path:
    """Write one feature store holding every row of ``stores`` (name → store), for pretraining on their union.

    Each store's rows are normalised with its own statistics first, so the pool is written already normalised
    (mean 0, std 1 in its meta). Labels and speakers are prefixed with the store's name (``fsdd/3``,
    ``esc10/dog``), ids too; splits are kept. Every store must have the same ``(n_mels, frames)``.

    Raises
    ------
    ValueError
        If ``stores`` is empty or two stores differ in shape or feature parameters.
    """
    if not stores:
        raise ValueError("pool_feature_stores: 'stores' must hold at least one store. Got none.")
    shapes = {name: tuple(store.features.shape[1:]) for name, store in stores.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"pool_feature_stores: every store must have the same (n_mels, frames). Got {shapes}.")
    settings = {name: dict(store.meta.get("features", {})) for name, store in stores.items()}
    first = next(iter(settings.values()))
    if any(s != first for s in settings.values()):
        raise ValueError(f"pool_feature_stores: every store must use the same feature parameters. Got {settings}.")
    arrays: list[np.ndarray] = []
    rows: list[dict[str, str]] = []
    labels: list[str] = []
    for name, store in stores.items():
        arrays.append(store.normalised(np.arange(store.num_samples))[:, 0])
        labels.extend(f"{name}/{label}" for label in store.label_names)
        for i in range(store.num_samples):
            rows.append({"id": f"{name}/{store.ids[i]}", "label": f"{name}/{store.label_names[store.labels[i]]}",
                         "speaker": f"{name}/{store.speakers[i]}", "split": str(store.splits[i])})
    dtype = str(first.get("dtype", "float32"))
    return write_feature_store(folder, np.concatenate(arrays), rows, labels, 0.0, 1.0, first, dtype, [])
