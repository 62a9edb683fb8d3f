"""Log-mel front end, batched extraction, normalisation statistics and the feature store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcore.config import FeaturesConfig, to_dict
from fedcore.data.features import (
    FeatureStore,
    LogMelExtractor,
    extract_clips,
    extract_features,
    label_index,
    normalisation_stats,
    write_feature_store,
)
from fedcore.errors import AudioError, DataError
from tests.conftest import sine, white_noise


def _tiny(**overrides: object) -> LogMelExtractor:
    """10 Hz, 1 s clips (10 samples) so that pad/crop results can be written by hand."""
    cfg = dict(sample_rate=10, clip_seconds=1.0, n_fft=8, win_length=8, hop_length=2, n_mels=2)
    cfg.update(overrides)
    return LogMelExtractor(FeaturesConfig(**cfg))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ extractor
def test_extractor_default_output_shape() -> None:
    extractor = LogMelExtractor(FeaturesConfig())
    log_mel = extractor(sine(16000, 1.3), 16000)
    assert extractor.output_shape == (64, 101)
    assert tuple(log_mel.shape) == (64, 101)
    assert log_mel.dtype == torch.float32
    assert torch.isfinite(log_mel).all()


def test_prepare_center_crop_keeps_middle_samples() -> None:
    clip = np.arange(14, dtype=np.float32)
    out = _tiny(crop="center").prepare(clip, 10)
    np.testing.assert_array_equal(out.numpy(), np.arange(2, 12, dtype=np.float32))


def test_prepare_start_crop_keeps_first_samples() -> None:
    out = _tiny(crop="start").prepare(np.arange(14, dtype=np.float32), 10)
    np.testing.assert_array_equal(out.numpy(), np.arange(10, dtype=np.float32))


@pytest.mark.parametrize(
    ("pad", "expected"),
    [
        ("end", [1, 2, 3, 4, 0, 0, 0, 0, 0, 0]),
        ("center", [0, 0, 0, 1, 2, 3, 4, 0, 0, 0]),
        ("repeat", [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]),
    ],
)
def test_prepare_pad_policies(pad: str, expected: list[float]) -> None:
    out = _tiny(pad=pad).prepare(np.array([1, 2, 3, 4], dtype=np.float32), 10)
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), np.array(expected, dtype=np.float32))


def test_prepare_mixes_channels_to_mono() -> None:
    stereo = np.stack([np.ones(10, np.float32), np.zeros(10, np.float32)])
    np.testing.assert_allclose(_tiny().prepare(stereo, 10).numpy(), np.full(10, 0.5))


def test_prepare_rejects_time_by_channels_and_bad_audio() -> None:
    extractor = _tiny()
    with pytest.raises(ValueError, match="transpose"):
        extractor.prepare(np.zeros((100, 2), np.float32), 10)
    with pytest.raises(TypeError, match="floating-point"):
        extractor.prepare(np.zeros(10, np.int16), 10)
    with pytest.raises(AudioError, match="empty"):
        extractor.prepare(np.zeros(0, np.float32), 10)
    with pytest.raises(AudioError, match=r"must be finite. Got 10 NaN and 0 Inf values \(first at flat index 0\)"):
        extractor.prepare(np.full(10, np.nan, np.float32), 10)
    with pytest.raises(AudioError, match="overflow to Inf in float32"):
        extractor.prepare(np.full(10, 1e300, np.float64), 10)
    with pytest.raises(ValueError, match="'sample_rate' must be a positive int"):
        extractor.prepare(np.zeros(10, np.float32), 0)


def test_prepare_resamples_and_keeps_frequency_peak() -> None:
    extractor = LogMelExtractor(FeaturesConfig())
    clip = extractor.prepare(sine(8000, 1.0, freq=1000.0), 8000)
    assert clip.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(clip.numpy()))
    peak_hz = np.argmax(spectrum) * 16000 / len(clip)
    assert abs(peak_hz - 1000.0) <= 1.0
    assert 0.45 < float(clip.abs().max()) < 0.55  # amplitude kept


def test_log_mel_peak_band_follows_frequency() -> None:
    extractor = LogMelExtractor(FeaturesConfig())
    low = extractor(sine(16000, 1.0, freq=300.0), 16000).mean(dim=-1).argmax()
    high = extractor(sine(16000, 1.0, freq=3000.0), 16000).mean(dim=-1).argmax()
    assert int(high) > int(low)


def test_extract_features_batched_equals_item_by_item() -> None:
    extractor = LogMelExtractor(FeaturesConfig())
    clips = [
        (sine(16000, 0.7, freq=440.0), 16000),
        (white_noise(16000, 1.2, seed=1), 16000),
        (sine(8000, 1.0, freq=700.0), 8000),
        (np.stack([white_noise(22050, 0.9, seed=2), sine(22050, 0.9)]), 22050),
        (white_noise(8000, 0.5, seed=3), 8000),
    ]
    calls: list[tuple[int, int]] = []
    batched = extract_features(lambda i: clips[i], len(clips), extractor, batch_size=2,
                               progress=lambda done, total: calls.append((done, total)))
    single = np.stack([extractor(*clip).numpy() for clip in clips])
    assert batched.shape == (5, 64, 101)
    assert batched.dtype == np.float32
    np.testing.assert_array_equal(batched, single)  # each clip on its own: bit for bit, whatever the batch size
    np.testing.assert_array_equal(extract_features(lambda i: clips[i], len(clips), extractor, batch_size=3), single)
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_extract_features_fills_given_out_array() -> None:
    extractor = _tiny()
    out = np.zeros((3, *extractor.output_shape), dtype=np.float16)
    result = extract_features(lambda i: (sine(10, 1.0, freq=2.0) * (i + 1), 10), 3, extractor, out=out)
    assert result is out
    assert not np.all(out == 0)


def test_extractor_restores_the_callers_thread_count() -> None:
    extractor = LogMelExtractor(FeaturesConfig())
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        extractor(sine(8000, 0.5), 8000)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_log_mel_overflow_is_an_audio_error_naming_the_peak() -> None:
    extractor = LogMelExtractor(FeaturesConfig())
    loud = np.full(16000, 1e30, np.float32)  # finite in float32; its power (1e60) is not
    with pytest.raises(AudioError, match=r"log_mel: features must be finite.*samples up to 1e\+30 overflows"):
        extractor(loud, 16000)
    with pytest.raises(AudioError, match=r"extract_features: item 1: log_mel"):
        extract_features(lambda i: (sine(16000), 16000) if i == 0 else (loud, 16000), 2, extractor)


def _clip_or_fault(i: int) -> tuple[np.ndarray, int]:
    """Items 0, 2 and 6 are good; the others fail each in its own way."""
    good = sine(16000, 0.8, freq=300.0 + 100 * i)
    faults: dict[int, object] = {
        1: np.where(np.arange(16000) == 7, np.nan, 0.1).astype(np.float32),  # a NaN sample
        3: np.full(16000, 1e30, np.float32),  # overflows in the power spectrogram
        4: AudioError("audio: '/abs/data/raw/x.wav' cannot be used: truncated: header declares 9 frames."),
        5: MemoryError(),
    }
    fault = faults.get(i)
    if isinstance(fault, BaseException):
        raise fault
    return (good if fault is None else fault), 16000  # type: ignore[return-value]


def test_extract_clips_skips_each_bad_clip_with_its_reason_and_keeps_the_rest() -> None:
    extractor = LogMelExtractor(FeaturesConfig())
    calls: list[tuple[int, int]] = []
    result = extract_clips(_clip_or_fault, 7, extractor, dtype="float16", every=3,
                           progress=lambda done, total: calls.append((done, total)))
    np.testing.assert_array_equal(result.kept, [0, 2, 6])
    assert result.features.shape == (3, 64, 101) and result.features.dtype == np.float16
    expected = np.stack([extractor(*_clip_or_fault(i)).numpy() for i in (0, 2, 6)]).astype(np.float16)
    np.testing.assert_array_equal(result.features, expected)
    reasons = dict(result.skipped)
    assert sorted(reasons) == [1, 3, 4, 5]
    assert "1 NaN and 0 Inf values" in reasons[1]
    assert "overflows float32" in reasons[3]
    assert reasons[4] == "truncated: header declares 9 frames"  # read_audio's reason, without its path
    assert "MemoryError" in reasons[5]
    assert calls == [(3, 7), (6, 7), (7, 7)]


def test_extract_clips_skips_values_beyond_float16() -> None:
    extractor = LogMelExtractor(FeaturesConfig(kind="waveform", clip_seconds=0.1))
    loads = [(np.full(1600, 0.5, np.float32), 16000), (np.full(1600, 1e5, np.float32), 16000)]
    result = extract_clips(loads.__getitem__, 2, extractor, dtype="float16")
    np.testing.assert_array_equal(result.kept, [0])
    assert "must fit float16. Got values up to 1e+05" in result.skipped[0][1]
    assert extract_clips(loads.__getitem__, 2, extractor, dtype="float32").kept.tolist() == [0, 1]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_items": -1}, "'num_items' must be an int >= 0"),
    ({"dtype": "float64"}, "'dtype' must be one of float16, float32"),
    ({"every": 0}, "'every' must be an int >= 1"),
])
def test_extract_clips_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"num_items": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        extract_clips(lambda i: (sine(), 16000), extractor=_tiny(), **args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- stats
def test_normalisation_stats_use_only_given_rows() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(3.0, 2.0, size=(600, 4, 5)).astype(np.float32)
    features[500:] = 1000.0  # outside the train rows
    rows = np.arange(500)
    mean, std = normalisation_stats(features, rows)
    reference = features[:500].astype(np.float64)
    assert mean == pytest.approx(reference.mean(), rel=1e-9)
    assert std == pytest.approx(reference.std(), rel=1e-9)


def test_normalisation_stats_rejects_empty_rows_and_constant_features() -> None:
    with pytest.raises(ValueError, match="'rows' must be a non-empty"):
        normalisation_stats(np.zeros((3, 2, 2), np.float32), np.array([], dtype=np.int64))
    with pytest.raises(DataError, match="'std' must be > 0"):
        normalisation_stats(np.zeros((3, 2, 2), np.float32), np.arange(3))


# ---------------------------------------------------------------------------------------------------- store
def test_label_index_orders_integers_naturally_and_names_lexicographically() -> None:
    assert label_index(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_index(["dog", "cat", "10", "2"]) == ["10", "2", "cat", "dog"]


def _write_store(folder: Path, dtype: str = "float16") -> tuple[np.ndarray, list[dict[str, str]]]:
    rng = np.random.default_rng(1)
    features = rng.normal(-4.0, 3.0, size=(6, 3, 4)).astype(np.float32)
    rows = [
        {"id": f"rec/{i}", "label": label, "speaker": f"s{i % 2}", "split": split}
        for i, (label, split) in enumerate(
            [("10", "train"), ("2", "train"), ("2", "train"), ("10", "train"), ("1", "test"), ("2", "test")]
        )
    ]
    names = label_index(r["label"] for r in rows)
    mean, std = normalisation_stats(features, np.arange(4))
    skipped = [{"path": "bad.wav", "reason": "truncated"}]
    write_feature_store(folder, features, rows, names, mean, std, to_dict(FeaturesConfig()), dtype, skipped)
    return features, rows


def test_feature_store_round_trip(tmp_path: Path) -> None:
    features, rows = _write_store(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.npy", "index.csv", "meta.json"]
    with open(tmp_path / "index.csv", newline="") as handle:
        records = list(csv.reader(handle))
    assert records[0] == ["row", "id", "label", "label_idx", "speaker", "split"]
    assert records[1] == ["0", "rec/0", "10", "2", "s0", "train"]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["labels"] == ["1", "2", "10"]
    assert meta["shape"] == [3, 4] and meta["num_samples"] == 6
    assert meta["features"]["n_mels"] == 64 and meta["skipped"][0]["path"] == "bad.wav"

    store = FeatureStore.load(tmp_path)
    assert isinstance(store.features, np.memmap)
    assert store.features.dtype == np.float16
    np.testing.assert_allclose(store.features, features, atol=1e-2)
    assert store.ids == [r["id"] for r in rows]
    assert store.label_names == ["1", "2", "10"]
    np.testing.assert_array_equal(store.labels, [2, 1, 1, 2, 0, 1])
    assert store.labels.dtype == np.int64
    assert store.speakers == ["s0", "s1"] * 3
    np.testing.assert_array_equal(store.rows_of_split("train"), [0, 1, 2, 3])
    np.testing.assert_array_equal(store.rows_of_split("test"), [4, 5])
    assert store.input_shape == (1, 3, 4) and store.num_classes == 3
    with pytest.raises(ValueError, match="'name' must be one of"):
        store.rows_of_split("validation")
    in_memory = FeatureStore.load(tmp_path, mmap=False)
    assert not isinstance(in_memory.features, np.memmap)


def test_feature_store_normalised_has_zero_mean_unit_std_on_train(tmp_path: Path) -> None:
    _write_store(tmp_path, dtype="float32")
    store = FeatureStore.load(tmp_path)
    train = store.normalised(store.rows_of_split("train"))
    assert train.shape == (4, 1, 3, 4) and train.dtype == np.float32
    assert float(train.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(train.std()) == pytest.approx(1.0, abs=1e-5)


def test_feature_store_rejects_unknown_label_and_missing_files(tmp_path: Path) -> None:
    rows = [{"id": "a", "label": "cat", "speaker": "s", "split": "train"}]
    with pytest.raises(ValueError, match="Missing \\['cat'\\]"):
        write_feature_store(tmp_path, np.zeros((1, 2, 2)), rows, ["dog"], 0.0, 1.0, {}, "float32", [])
    with pytest.raises(DataError, match="features stage"):
        FeatureStore.load(tmp_path / "nothing")


def test_feature_store_detects_inconsistent_index(tmp_path: Path) -> None:
    _write_store(tmp_path)
    lines = (tmp_path / "index.csv").read_text().splitlines()
    (tmp_path / "index.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match="must agree"):
        FeatureStore.load(tmp_path)


def test_waveform_kind_stores_the_prepared_clip_as_one_band() -> None:
    from fedcore.config import FeaturesConfig
    from fedcore.data.features import LogMelExtractor

    cfg = FeaturesConfig(kind="waveform", clip_seconds=0.5, pad="end")
    extractor = LogMelExtractor(cfg)
    clip = np.linspace(-0.5, 0.5, 6000, dtype=np.float32)
    out = extractor(clip, 16000)
    assert extractor.output_shape == (1, 8000) and tuple(out.shape) == (1, 8000)
    assert torch.equal(out[0], extractor.prepare(clip, 16000))  # the samples themselves, zero-padded at the end
    assert float(out[0, 6000:].abs().max()) == 0.0
