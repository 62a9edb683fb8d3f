"""The features stage (tasks.data.featurise): byte-identical output, per-file skips, unusable datasets refused."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from fedcore.config import FeaturesConfig
from fedcore.data.audio import read_audio
from fedcore.data.features import LogMelExtractor, cropped_share, extract_features
from fedcore.data.manifest import ManifestRow, read_manifest, write_manifest
from fedcore.errors import DataError
from tasks.common import read_params
from tasks.data import featurise
from tests.conftest import sine, white_noise

STORE_FILES = ("features.npy", "index.csv", "meta.json")
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fsdd_raw(tmp_path_factory: pytest.TempPathFactory, fsdd_zip: Path) -> Path:
    """Every fifth FSDD recording by name, 600 real clips (8 kHz, resampled to 16 kHz by the stage), with a manifest.

    Before the fix, many of these clips resampled to other last bits with 4 intra-op threads than with 1.
    """
    raw = tmp_path_factory.mktemp("fsdd_raw")
    rows = []
    with zipfile.ZipFile(fsdd_zip) as archive:
        wavs = sorted(n for n in archive.namelist() if n.endswith(".wav") and "/recordings/" in n)
        names = [n for digit in "0123456789" for n in wavs if n.rsplit("/", 1)[-1].startswith(f"{digit}_")][::5]
        for name in names:
            path = Path("recordings") / name.rsplit("/", 1)[-1]
            (raw / path).parent.mkdir(exist_ok=True)
            (raw / path).write_bytes(archive.read(name))
            digit, speaker, index = path.stem.split("_")
            info = sf.info(str(raw / path))
            rows.append(ManifestRow(path.stem, path.as_posix(), digit, speaker, "test" if int(index) < 5 else "train",
                                    info.frames / info.samplerate, info.samplerate))
    write_manifest(rows, raw / "manifest.csv")
    return raw


def _hashes(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in STORE_FILES}


def _featurise_with_threads(threads: int, raw: Path, out: Path) -> dict[str, str]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        featurise.fn(FeaturesConfig(pad="repeat"), raw, out)
    finally:
        torch.set_num_threads(before)
    return _hashes(out)


def test_features_stage_is_byte_identical_whatever_threads_folder_and_neighbours(fsdd_raw: Path,
                                                                                 tmp_path: Path) -> None:
    # The same manifest from another folder, featurised with 1 and with 4 intra-op threads (before the fix, 4
    # threads changed the resampled samples of about a third of FSDD's clips, and so features.npy and meta.json).
    elsewhere = tmp_path / "another" / "copy" / "raw"
    shutil.copytree(fsdd_raw, elsewhere)
    first = _featurise_with_threads(1, fsdd_raw, tmp_path / "one")
    second = _featurise_with_threads(4, elsewhere, tmp_path / "four")
    assert first == second

    # Nothing run-specific in the folder: just the three files, no path of this machine inside them.
    for out in (tmp_path / "one", tmp_path / "four"):
        assert sorted(p.name for p in out.iterdir()) == sorted(STORE_FILES)
        for name in STORE_FILES:
            data = (out / name).read_bytes()
            assert str(tmp_path).encode() not in data and str(fsdd_raw).encode() not in data
    meta = json.loads((tmp_path / "one" / "meta.json").read_text())
    assert set(meta) == {"labels", "mean", "std", "features", "num_samples", "shape", "skipped"}

    # A clip's features do not depend on its neighbours (batch, chunk, skipped files): drop every third row and
    # every kept clip's row is the same bytes; batched extraction of the same clips agrees bit for bit too.
    rows = read_manifest(fsdd_raw / "manifest.csv")
    subset = tmp_path / "subset"
    shutil.copytree(fsdd_raw, subset)
    write_manifest([row for i, row in enumerate(rows) if i % 3], subset / "manifest.csv")
    _featurise_with_threads(2, subset, tmp_path / "subset_out")
    full = np.load(tmp_path / "one" / "features.npy")
    part = np.load(tmp_path / "subset_out" / "features.npy")
    np.testing.assert_array_equal(part, full[[i for i in range(len(rows)) if i % 3]])
    extractor = LogMelExtractor(FeaturesConfig(pad="repeat"))
    batched = extract_features(lambda i: read_audio(fsdd_raw / rows[i].path), 40, extractor, batch_size=7)
    np.testing.assert_array_equal(batched.astype(np.float16), full[:40])


# ------------------------------------------------------------------------------------------- faults per file
def _write(raw: Path, name: str, data: np.ndarray, label: str, split: str, subtype: str = "FLOAT",
           sample_rate: int = 16000) -> ManifestRow:
    sf.write(raw / f"{name}.wav", data, sample_rate, subtype=subtype)
    return ManifestRow(name, f"{name}.wav", label, f"spk{label}", split, len(data) / sample_rate, sample_rate)


def _good_rows(raw: Path) -> list[ManifestRow]:
    raw.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(8):
        clip = sine(16000, 0.6, freq=300.0 + 200 * i) if i % 2 else white_noise(16000, 0.6, seed=i)
        rows.append(_write(raw, f"good{i}", clip, str(i % 2), "train" if i < 6 else "test",
                           subtype="PCM_16" if i % 3 == 0 else "FLOAT"))
    return rows


def test_features_stage_skips_nan_inf_and_overflowing_wavs_naming_each(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    raw = tmp_path / "raw"
    rows = _good_rows(raw)
    nan = white_noise(16000, 0.6, seed=9)
    nan[123] = np.nan
    inf = sine(16000, 0.6)
    inf[7] = -np.inf
    rows += [
        _write(raw, "bad_nan", nan, "0", "train"),
        _write(raw, "bad_inf", inf, "1", "train"),
        _write(raw, "bad_huge", np.full(9600, 1e30, np.float32), "1", "train"),  # float WAV holding 1e30
        _write(raw, "bad_double", np.full(9600, 1e300), "0", "test", subtype="DOUBLE"),  # Inf once float32
    ]
    write_manifest(rows, raw / "manifest.csv")
    with caplog.at_level(logging.WARNING, logger="tasks.data"):
        summary = featurise.fn(FeaturesConfig(), raw, tmp_path / "features")
    assert summary["num_samples"] == 8 and summary["num_skipped"] == 4
    meta = json.loads((tmp_path / "features" / "meta.json").read_text())
    reasons = {entry["path"]: entry["reason"] for entry in meta["skipped"]}
    assert sorted(reasons) == ["bad_double.wav", "bad_huge.wav", "bad_inf.wav", "bad_nan.wav"]
    assert "NaN" in reasons["bad_nan.wav"] and "Inf" in reasons["bad_inf.wav"]
    assert "1e+30" in reasons["bad_huge.wav"] and "Inf" in reasons["bad_double.wav"]
    assert all(str(tmp_path) not in reason for reason in reasons.values())
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert all(path in warned for path in reasons)
    with (tmp_path / "features" / "index.csv").open(newline="") as handle:
        assert [r["id"] for r in csv.DictReader(handle)] == [f"good{i}" for i in range(8)]
    assert np.isfinite(np.load(tmp_path / "features" / "features.npy").astype(np.float32)).all()


@pytest.mark.parametrize(("spoil", "match"), [
    ({"good1", "good3", "good5", "good7"}, r"at least two classes. Got 1 \('0'\) after skipping 4 of 8 files "
                                           r"\(first: good1.wav: .*\). Fix: ingest a dataset with two or more"),
    ({"good6", "good7"}, r"rows of split 'test'. Got none after skipping 2 of 8 files.*Fix: set "
                         r"download.test_fraction > 0"),
    ({f"good{i}" for i in range(6)}, r"rows of split 'train'. Got none after skipping 6 of 8.*Fix: give the "
                                     r"manifest a 'train' split"),
])
def test_features_stage_refuses_a_dataset_left_unusable_by_skips(tmp_path: Path, spoil: set[str],
                                                                 match: str) -> None:
    raw = tmp_path / "raw"
    rows = _good_rows(raw)
    for row in rows:
        if row.id in spoil:
            sf.write(raw / row.path, np.full(9600, np.nan, np.float32), 16000, subtype="FLOAT")
    write_manifest(rows, raw / "manifest.csv")
    with pytest.raises(DataError, match=match):
        featurise.fn(FeaturesConfig(), raw, tmp_path / "features")
    assert not (tmp_path / "features" / "meta.json").exists()


def test_features_stage_refuses_a_single_class_manifest(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_manifest([row.__class__(**{**row.__dict__, "label": "7"}) for row in _good_rows(raw)],
                   raw / "manifest.csv")
    with pytest.raises(DataError, match=r"at least two classes. Got 1 \('7'\)\. Fix:"):
        featurise.fn(FeaturesConfig(), raw, tmp_path / "features")


def test_features_stage_refuses_a_feature_array_beyond_memory_before_reading(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    rows = _good_rows(raw)
    write_manifest(rows, raw / "manifest.csv")
    (raw / rows[0].path).write_bytes(b"not audio")  # never read: the size check comes first
    with pytest.raises(DataError, match=r"feature array must fit in the memory at hand \(.* GiB\). Got 8 clips × "
                                        r"\(64, 100000000001\) × float16 = 9.54e\+04 GiB. Fix: lower "
                                        r"features.clip_seconds"):
        featurise.fn(FeaturesConfig(clip_seconds=1e9), raw, tmp_path / "features")


def test_cropped_share_is_the_audio_beyond_the_clip_over_all_audio() -> None:
    # clips of 0.5, 2 and 5 s cut to 1 s: 0 + 1 + 4 of 7.5 seconds discarded
    assert cropped_share([0.5, 2.0, 5.0], 1.0) == pytest.approx(5.0 / 7.5)
    assert cropped_share([0.5, 0.9], 1.0) == 0.0 and cropped_share([], 1.0) == 0.0


@pytest.mark.parametrize(("clip_seconds", "warned"), [(0.2, True), (0.6, False)])
def test_features_stage_warns_when_its_crop_discards_most_of_the_audio(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, clip_seconds: float, warned: bool) -> None:
    raw = tmp_path / "raw"
    write_manifest(_good_rows(raw), raw / "manifest.csv")  # 0.6 s clips
    with caplog.at_level(logging.WARNING):
        summary = featurise.fn(FeaturesConfig(clip_seconds=clip_seconds), raw, tmp_path / "features")
    assert summary["cropped_share"] == pytest.approx(max(0.0, 0.6 - clip_seconds) / 0.6)
    messages = [r.getMessage() for r in caplog.records if "discards" in r.getMessage()]
    expected = (f"features: cropping every clip to features.clip_seconds = {clip_seconds:g} s discards 67% of the "
                "audio (the clips last 0.6 s at the median). Fix: set features.clip_seconds (e.g. 0.6), or leave it "
                "null for the dataset's own length.")
    assert messages == ([expected] if warned else [])


@pytest.mark.parametrize(("dataset", "given", "used"), [
    ("fsdd", None, 1.0), ("esc50", None, 5.0), ("esc50", 2.0, 2.0), ("speechcommands", None, 1.0)])
def test_a_null_clip_length_is_the_datasets_own_and_a_set_one_wins(
        tmp_path: Path, dataset: str, given: float | None, used: float) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"download": {"dataset": dataset}, "features": {"clip_seconds": given}}))
    assert read_params(params).features.clip_seconds == used


def test_the_default_params_leave_the_clip_length_to_the_dataset() -> None:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert params["features"]["clip_seconds"] is None
    assert read_params(REPO_ROOT / "params.yaml").features.clip_seconds == 1.0  # fsdd's


def test_the_front_end_refuses_an_unresolved_clip_length() -> None:
    with pytest.raises(ValueError, match="'clip_seconds' must be a number of seconds here. Got None"):
        LogMelExtractor(FeaturesConfig(clip_seconds=None))
