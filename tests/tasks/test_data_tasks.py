"""Data tasks called through .fn (no Prefect run): the chain ingest → features → partition → poison."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedcore.config import DownloadConfig, FeaturesConfig, PartitionConfig, PoisonConfig
from fedcore.errors import DownloadError
from tasks.data import featurise, ingest_dataset, partition_clients, poison_clients


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, fsdd_small_zip: Path) -> Path:
    root = tmp_path_factory.mktemp("chain")
    mirror = root / "mirror" / "fsdd"
    mirror.mkdir(parents=True)
    shutil.copy(fsdd_small_zip, mirror / fsdd_small_zip.name)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("FEDAUDIO_MIRROR", raising=False)
        report = ingest_dataset.fn(DownloadConfig(mirror=str(root / "mirror")), root / "raw", root / "dl")
    assert report["num_ok"] == 180
    featurise.fn(FeaturesConfig(clip_seconds=0.5), root / "raw", root / "features")
    partition_clients.fn(PartitionConfig(num_clients=4, min_samples=5), root / "features", root / "part")
    return root


@pytest.mark.parametrize("via_env", [True, False])
def test_ingest_task_refuses_a_missing_mirror_instead_of_going_online(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, via_env: bool
) -> None:
    missing = tmp_path / "typo-mirror"
    if via_env:
        monkeypatch.setenv("FEDAUDIO_MIRROR", str(missing))
    else:
        monkeypatch.delenv("FEDAUDIO_MIRROR", raising=False)
    cfg = DownloadConfig(url="http://127.0.0.1:9/never-asked.zip", mirror=None if via_env else str(missing))
    with pytest.raises(DownloadError) as error:
        ingest_dataset.fn(cfg, tmp_path / "raw", tmp_path / "dl")
    message = str(error.value)
    assert str(missing) in message and ("env FEDAUDIO_MIRROR" if via_env else "download.mirror") in message
    assert "never-asked" not in message and not (tmp_path / "dl").exists()


def test_ingest_task_summary_keeps_provenance_out_of_the_output(chain: Path) -> None:
    report = json.loads((chain / "raw" / "report.json").read_text())
    assert "source" not in report and "url" not in report and report["num_refused"] == 0
    provenance = json.loads((chain / "dl" / "fsdd.source.json").read_text())
    assert provenance["source"] == str(chain / "mirror" / "fsdd" / "free-spoken-digit-dataset-master.zip")
    assert provenance["sha256"] == report["sha256"]


def test_features_are_indexed_and_normalised_from_train_only(chain: Path) -> None:
    with (chain / "features/index.csv").open() as handle:
        index = list(csv.DictReader(handle))
    features = np.load(chain / "features/features.npy").astype(np.float64)
    meta = json.loads((chain / "features/meta.json").read_text())
    train = [int(r["row"]) for r in index if r["split"] == "train"]
    assert features.shape == (180, 64, 51)
    assert meta["mean"] == pytest.approx(features[train].mean(), rel=1e-3)
    assert meta["std"] == pytest.approx(features[train].std(), rel=1e-3)
    assert meta["mean"] != pytest.approx(features.mean(), rel=1e-4)


def test_partition_covers_the_train_split_once(chain: Path) -> None:
    part = json.loads((chain / "part/partition.json").read_text())
    rows = [r for c in part["clients"] for r in c["train"] + c["holdout"]]
    assert sorted(rows) == sorted(set(rows)) and len(rows) == 120
    stats = (chain / "part/client_stats.csv").read_text().splitlines()
    assert stats[0].startswith("client_id,num_train,num_holdout") and len(stats) == 5


def test_label_flip_overlay_changes_only_attacked_training_rows(chain: Path) -> None:
    cfg = PoisonConfig(attack="label_flip", client_fraction=0.5, seed=3)
    summary = poison_clients.fn(cfg, FeaturesConfig(clip_seconds=0.5), chain / "raw", chain / "features",
                                chain / "part/partition.json", chain / "poison")
    part = json.loads((chain / "part/partition.json").read_text())
    attacked_rows = {r for c in summary["attacked_clients"] for r in part["clients"][c]["train"]}
    with np.load(chain / "poison/overlay.npz") as overlay:
        assert set(overlay["label_rows"].tolist()) <= attacked_rows
        assert overlay["features"].shape[0] == 0
    assert len(summary["attacked_clients"]) == 2
