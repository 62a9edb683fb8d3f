"""The serving spec and classifier of a logged model: audio in, the pipeline's features and predictions out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from fedcore.config import FeaturesConfig, ModelConfig, to_dict
from fedcore.data.audio import read_audio
from fedcore.data.features import FeatureStore, LogMelExtractor, extract_clips, write_feature_store
from fedcore.errors import AudioError
from fedcore.evaluation.metrics import predict
from fedcore.federation.checkpoint import save_state
from fedcore.models.spec import build, classifier_spec
from fedcore.serving import SERVING_FILE, ServingSpec, _load_pyfunc, load_classifier
from tests.conftest import sine, white_noise

#: 16 kHz, 0.5 s clips, 16 mel bands: small, but the pipeline's front end (8 kHz WAVs are resampled).
FEATURES = FeaturesConfig(sample_rate=16000, clip_seconds=0.5, n_mels=16)
LABELS = ("0", "1", "2")


def model_folder(folder: Path, spec: ServingSpec | None = None) -> Path:
    """A model folder as the federate stage logs it: model_spec.json, weights.safetensors, serving.json."""
    shape = (1, *LogMelExtractor(FEATURES).output_shape)
    model_spec = classifier_spec(ModelConfig(name="cnn", width=2, depth=1), len(LABELS), shape)
    model = build(model_spec, torch.Generator().manual_seed(3))
    model.train()(torch.randn(4, *shape))  # BatchNorm statistics away from their initial values
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_spec.json").write_text(model_spec.to_json())
    save_state(folder / "weights.safetensors", model.state_dict())
    spec = spec or ServingSpec(features=FEATURES, mean=-6.5, std=4.25, labels=LABELS, batch_size=2)
    (folder / SERVING_FILE).write_text(spec.to_json())
    return folder


def wav_files(folder: Path) -> list[Path]:
    """Real-looking clips: 8 kHz PCM-16 WAVs (as FSDD), shorter and longer than a clip, tone and noise."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = [sine(8000, 0.3, 300.0), white_noise(8000, 0.9, seed=1), sine(8000, 0.5, 1200.0) + white_noise(
        8000, 0.5, seed=2) * 0.1, white_noise(8000, 0.2, seed=3) * 0.3, sine(8000, 0.7, 50.0)]
    paths = []
    for i, clip in enumerate(clips):
        path = folder / f"{i}_clip.wav"
        sf.write(path, clip, 8000, subtype="PCM_16")
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------- the spec
def test_serving_spec_round_trips_through_json() -> None:
    spec = ServingSpec(features=FEATURES, mean=-6.123456789012345, std=4.5, labels=LABELS,
                       model_spec="model_spec.json", weights="extra_files/weights.safetensors", batch_size=7)
    again = ServingSpec.from_json(spec.to_json())
    assert again == spec
    assert json.loads(spec.to_json())["features"] == to_dict(FEATURES)


def test_serving_spec_from_feature_meta_keeps_settings_statistics_and_label_order(tmp_path: Path) -> None:
    features = np.random.default_rng(0).normal(size=(4, 16, 51)).astype(np.float16)
    rows = [{"id": f"c{i}", "label": label, "speaker": "s", "split": split}
            for i, (label, split) in enumerate([("10", "train"), ("2", "train"), ("2", "test"), ("10", "test")])]
    write_feature_store(tmp_path, features, rows, ["2", "10"], -6.25, 3.5, to_dict(FEATURES), "float16", [])
    spec = ServingSpec.from_feature_store(tmp_path, batch_size=5)
    assert spec.features == FEATURES
    assert (spec.mean, spec.std, spec.labels, spec.batch_size) == (-6.25, 3.5, ("2", "10"), 5)


def _spec_json(**changes: object) -> str:
    raw = json.loads(ServingSpec(features=FEATURES, mean=0.0, std=1.0, labels=LABELS).to_json())
    for key, value in changes.items():
        if value is KeyError:
            del raw[key]
        else:
            raw[key] = value
    return json.dumps(raw)


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "must be JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"version": 1, "version": 1}', "duplicate keys"),
    (_spec_json(labels=KeyError), "keys must be"),
    (_spec_json(extra=1), "keys must be"),
    (_spec_json(version=2), "'version' must be 1"),
    (_spec_json(std=0.0), "'std' must be > 0"),
    (_spec_json(mean="NaN"), "'mean' must be a finite number"),
    (_spec_json(labels=["a", "a", "b"]), "'labels' must be unique"),
    (_spec_json(labels=["a"]), "at least 2 class names"),
    (_spec_json(labels=["label", "b"]), "must not hold \\['label'\\]"),
    (_spec_json(features={"n_mels": 0}), "'n_mels' must be"),
    (_spec_json(features={"hop": 3}), "unknown keys \\['hop'\\]"),
    (_spec_json(batch_size=0), "'batch_size' must be an int >= 1"),
    (_spec_json(weights="../../outside.safetensors"), "'weights' must be a relative file name inside the model"),
    (_spec_json(model_spec="/etc/passwd"), "'model_spec' must be a relative file name inside the model"),
    (_spec_json(weights="extra_files/../../x"), "'weights' must be a relative file name"),
])
def test_bad_serving_spec_is_refused_with_its_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServingSpec.from_json(text, "serving.json")


def test_oversized_serving_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="must be at most"):
        ServingSpec.from_json(" " * (2 << 20))


# --------------------------------------------------------------------------------------------------- loading
def test_missing_serving_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be a serving spec \\(serving.json\\) or a model folder"):
        load_classifier(tmp_path / "nothing" / SERVING_FILE)
    with pytest.raises(ValueError, match="must be a serving spec"):
        _load_pyfunc(str(tmp_path))  # a folder without serving.json


def test_missing_weights_are_named(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m")
    (folder / "weights.safetensors").unlink()
    with pytest.raises(ValueError, match="must hold 'weights.safetensors'"):
        load_classifier(folder)


def test_a_weights_link_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m")
    outside = tmp_path / "outside.safetensors"
    (folder / "weights.safetensors").rename(outside)
    os.symlink(outside, folder / "weights.safetensors")
    with pytest.raises(ValueError, match="must be a regular file inside the model folder"):
        load_classifier(folder / SERVING_FILE)


def test_a_spec_whose_labels_do_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    spec = ServingSpec(features=FEATURES, mean=0.0, std=1.0, labels=("a", "b"))
    with pytest.raises(ValueError, match="one logit per class \\(2\\)"):
        load_classifier(model_folder(tmp_path / "m", spec))


def test_a_spec_whose_features_do_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m")
    spec = ServingSpec(features=FeaturesConfig(sample_rate=16000, clip_seconds=0.5, n_mels=20), mean=0.0, std=1.0,
                       labels=LABELS)
    (folder / SERVING_FILE).write_text(spec.to_json())
    with pytest.raises(ValueError, match="must be those the model was trained on"):
        load_classifier(folder)


# --------------------------------------------------------------------------------------------------- predicting
def test_predictions_equal_the_pipelines_on_the_feature_store(tmp_path: Path) -> None:
    """Features bit for bit as the features stage stores them (float16) and normalised as the federate stage does."""
    paths = wav_files(tmp_path / "wav")
    clips = extract_clips(lambda i: read_audio(paths[i]), len(paths), LogMelExtractor(FEATURES), dtype="float16")
    assert clips.skipped == []
    rows = [{"id": p.stem, "label": LABELS[i % 3], "speaker": "s", "split": "train"} for i, p in enumerate(paths)]
    write_feature_store(tmp_path / "store", clips.features, rows, list(LABELS), -6.5, 4.25, to_dict(FEATURES),
                        "float16", [])
    store = FeatureStore.load(tmp_path / "store")
    spec = ServingSpec.from_feature_store(tmp_path / "store", batch_size=2)
    classifier = load_classifier(model_folder(tmp_path / "m", spec))

    expected = store.normalised(np.arange(len(paths)))
    got, _ = classifier.features([str(p) for p in paths])
    assert got.dtype == np.float32 and np.array_equal(got, expected)

    logits = predict(classifier.model, torch.from_numpy(expected), 2)
    out = classifier.predict([str(p) for p in paths])
    assert list(out.columns) == ["label", *LABELS]
    assert out["label"].tolist() == [LABELS[i] for i in logits.argmax(dim=1).tolist()]
    np.testing.assert_allclose(out[list(LABELS)].to_numpy(), torch.softmax(logits.double(), 1).numpy())
    np.testing.assert_allclose(out[list(LABELS)].sum(axis=1), 1.0)


def test_every_input_form_gives_the_same_prediction(tmp_path: Path) -> None:
    paths = wav_files(tmp_path / "wav")
    classifier = load_classifier(model_folder(tmp_path / "m"))
    listed = classifier.predict([str(p) for p in paths])
    one = classifier.predict(str(paths[1]))
    pd.testing.assert_frame_equal(one, listed.iloc[[1]].reset_index(drop=True))
    pd.testing.assert_frame_equal(classifier.predict(paths[1]), one)  # a Path
    frame = pd.DataFrame({"path": [str(p) for p in paths], "speaker": "s"}, index=[f"r{i}" for i in range(5)])
    by_frame = classifier.predict(frame)
    assert list(by_frame.index) == list(frame.index)
    pd.testing.assert_frame_equal(by_frame.reset_index(drop=True), listed)
    waveform, rate = read_audio(paths[1])  # 8 kHz: resampled to the spec's rate, as the model expects
    resampled = LogMelExtractor(FEATURES).prepare(waveform, rate).numpy()
    pd.testing.assert_frame_equal(classifier.predict(resampled), classifier.predict(resampled.astype(np.float64)))


@pytest.mark.parametrize(("model_input", "error", "message"), [
    (np.zeros((2, 100), dtype=np.float32), ValueError, "1-D float array at 16000 Hz"),
    (np.zeros(100, dtype=np.int16), ValueError, "1-D float array"),
    (pd.DataFrame({"file": ["a.wav"]}), ValueError, "must have a 'path' column"),
    ([1, 2], TypeError, "item 0 must be a file path"),
    ([], ValueError, "must hold at least one clip"),
    (3.5, TypeError, "must be a file path, a list of file paths"),
])
def test_bad_inputs_are_refused(tmp_path: Path, model_input: object, error: type[Exception], message: str) -> None:
    classifier = load_classifier(model_folder(tmp_path / "m"))
    with pytest.raises(error, match=message):
        classifier.predict(model_input)


def test_an_unreadable_file_names_the_clip(tmp_path: Path) -> None:
    classifier = load_classifier(model_folder(tmp_path / "m"))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not a wav")
    with pytest.raises(AudioError, match="clip 1 .*bad.wav"):
        classifier.predict([str(wav_files(tmp_path / "wav")[0]), str(bad)])
