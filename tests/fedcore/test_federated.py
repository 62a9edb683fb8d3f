from __future__ import annotations

import numpy as np
import torch

from fedcore.data.features import FeatureStore
from fedcore.data.federated import Overlay, build_federated_dataset


def store() -> FeatureStore:
    features = np.arange(8 * 2 * 3, dtype=np.float32).reshape(8, 2, 3)
    return FeatureStore(features=features, ids=[f"s{i}" for i in range(8)],
                        labels=np.array([0, 1, 0, 1, 0, 1, 0, 1]), label_names=["a", "b"],
                        speakers=["x"] * 8, splits=np.array(["train"] * 6 + ["test"] * 2), mean=2.0, std=4.0)


PARTITION = {"clients": [{"client_id": 0, "train": [0, 1], "holdout": [2]},
                         {"client_id": 1, "train": [3, 4], "holdout": []}],
             "test": [6, 7]}


def test_tensors_are_normalised_and_split_per_client() -> None:
    data = build_federated_dataset(store(), PARTITION)
    assert data.num_clients == 2 and data.num_classes == 2 and data.input_shape == (1, 2, 3)
    expected = (torch.arange(6, 12, dtype=torch.float32).reshape(1, 2, 3) - 2.0) / 4.0
    assert torch.equal(data.train[0].features[1], expected)
    assert data.train[1].labels.tolist() == [1, 0]
    assert data.test.labels.tolist() == [0, 1]
    assert data.holdout[0] is not None and data.holdout[0].labels.tolist() == [0]
    assert data.holdout[1] is None  # no held-out rows: no personalised evaluation for that client


def test_overlay_changes_training_rows_only() -> None:
    raw = np.full((1, 2, 3), 10.0, dtype=np.float32)
    overlay = Overlay(label_rows=np.array([0, 2]), labels=np.array([1, 1]), feature_rows=np.array([4]),
                      features=raw)
    data = build_federated_dataset(store(), PARTITION, overlay)
    assert data.train[0].labels.tolist() == [1, 1]          # row 0 flipped, row 1 untouched
    assert data.holdout[0] is not None and data.holdout[0].labels.tolist() == [0]  # held-out row 2 stays clean
    assert torch.equal(data.train[1].features[1], torch.full((1, 2, 3), 2.0))   # (10 - 2) / 4
    clean = build_federated_dataset(store(), PARTITION)
    assert torch.equal(data.train[1].features[0], clean.train[1].features[0])


def test_clients_sharing_rows_hold_positions_into_one_copy() -> None:
    many = {"clients": [{"client_id": c, "train": [c % 3, 3 + c % 2], "holdout": []} for c in range(1000)],
            "test": [6, 7]}
    data = build_federated_dataset(store(), many)
    assert data.num_clients == 1000 and len(data.holdout) == 1000
    one = build_federated_dataset(store(), PARTITION)
    assert torch.equal(data.train[7].features, torch.stack([one.train[0].features[1], one.train[1].features[1]]))
    assert data.train[999].labels.tolist() == [0, 0]  # rows 0 and 4
    assert data.train[-1].labels.tolist() == data.train[999].labels.tolist()
    assert all(part is None for part in data.holdout[:5])
    # five distinct training rows are normalised once, however many clients hold them
    assert data.train._features.shape[0] == 5  # type: ignore[attr-defined]
