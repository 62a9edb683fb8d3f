"""The partition stage (tasks.data.partition_clients) refuses sizes that cannot fit before any work."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from fedcore.config import FeaturesConfig, PartitionConfig, to_dict
from fedcore.data.features import label_index, write_feature_store
from fedcore.errors import PartitionError
from tasks.data import partition_clients


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A feature store of 300 rows (240 train, 60 test), 10 classes, 6 speakers."""
    folder = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 4, 5)).astype(np.float32)
    rows = [{"id": f"clip{i:03d}", "label": str(i % 10), "speaker": f"spk{i % 6}",
             "split": "train" if i < 240 else "test"} for i in range(300)]
    write_feature_store(folder, features, rows, label_index(r["label"] for r in rows), 0.0, 1.0,
                        to_dict(FeaturesConfig()), "float32", [])
    return folder


@pytest.mark.parametrize(("cfg", "match"), [
    (PartitionConfig(scheme="cross_device", num_clients=10**9, samples_per_client=20),
     r"partition: the partition must fit in the memory at hand \(.* GiB\). Got 1000000000 clients and "
     r"20000000000 client-row entries, about 6.15e\+03 GiB. Lower num_clients or samples_per_client"),
    (PartitionConfig(scheme="dirichlet", num_clients=10, min_samples=30, max_retries=10**9),
     r"num_clients × min_samples = 10 × 30 = 300 rows, above the 240 training rows. Lower min_samples \(to at "
     r"most 24\) or num_clients \(to at most 8\)"),
    (PartitionConfig(scheme="speaker", num_clients=7, min_samples=1),
     r"'num_clients' must be <= the number of speakers \(6\) for scheme 'speaker'. Got 7"),
])
def test_partition_stage_refuses_sizes_that_cannot_fit_within_a_second(
    store: Path, tmp_path: Path, cfg: PartitionConfig, match: str
) -> None:
    start = time.perf_counter()
    with pytest.raises(PartitionError, match=match):
        partition_clients.fn(cfg, store, tmp_path / "out")
    assert time.perf_counter() - start < 1.0
    assert not (tmp_path / "out" / "partition.json").exists()


def test_partition_stage_still_writes_a_cross_device_population_that_fits(store: Path, tmp_path: Path) -> None:
    cfg = PartitionConfig(scheme="cross_device", num_clients=100, samples_per_client=8)
    summary = partition_clients.fn(cfg, store, tmp_path / "out")
    partition = json.loads((tmp_path / "out" / "partition.json").read_text())
    assert summary["num_clients"] == len(partition["clients"]) == 100
    assert all(len(c["train"]) + len(c["holdout"]) == 8 for c in partition["clients"])
