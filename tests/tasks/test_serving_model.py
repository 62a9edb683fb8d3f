"""A federate tracker with a serving spec logs models that ``mlflow.pyfunc`` loads and that classify audio files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import soundfile as sf
import torch

from fedcore.config import FeaturesConfig, MlflowConfig, ModelConfig
from fedcore.data.features import LogMelExtractor
from fedcore.federation.checkpoint import save_state
from fedcore.models.spec import build, classifier_spec
from fedcore.serving import ServingSpec, load_classifier
from tasks.tracking import PARENT_ENV, FederateTracker, load_model
from tests.conftest import sine, white_noise

FEATURES = FeaturesConfig(sample_rate=16000, clip_seconds=0.5, n_mels=16)
SHAPE = (1, *LogMelExtractor(FEATURES).output_shape)
SPEC = classifier_spec(ModelConfig(name="cnn", width=2, depth=1), 3, SHAPE)
SERVING = ServingSpec(features=FEATURES, mean=-6.5, std=4.25, labels=("yes", "no", "maybe"), batch_size=4)


@pytest.fixture()
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowConfig:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_ENV, raising=False)
    (tmp_path / "store").mkdir()
    return MlflowConfig(tracking_uri="sqlite:///store/mlflow.db", experiment="t", registered_model="t-global")


@pytest.mark.parametrize("export_pt2", [False, True])
def test_logged_rounds_classify_audio_through_mlflow_pyfunc(cfg: MlflowConfig, tmp_path: Path,
                                                            export_pt2: bool) -> None:
    tracker = FederateTracker(cfg, tmp_path, model_spec=SPEC, serving=SERVING, export_pt2=export_pt2)
    tracker.start({"federation.rounds": 2})
    tracker.prepare_export(build(SPEC), SHAPE, "weights.safetensors")
    models, ids = [], []
    for server_round in (1, 2):
        model = build(SPEC, torch.Generator().manual_seed(server_round))
        model.train()(torch.randn(4, *SHAPE))
        weights = tmp_path / f"r{server_round}" / "weights.safetensors"
        save_state(weights, model.state_dict())
        ids.append(tracker.log_round(server_round, {"global_accuracy": 0.25 * server_round}, model, SHAPE, weights))
        models.append(model.eval())
    version = tracker.finish({"global_accuracy": 0.5}, 2, [], metric="global_accuracy", study="fedavg")

    wavs = []
    for i, clip in enumerate([sine(8000, 0.3), white_noise(8000, 0.8, seed=4), sine(8000, 0.6, 900.0)]):
        wavs.append(str(tmp_path / f"{i}.wav"))
        sf.write(wavs[-1], clip, 8000, subtype="PCM_16")
    for model, model_id in zip(models, ids, strict=True):
        uri = f"models:/{model_id}"
        info = mlflow.models.get_model_info(uri)
        assert set(info.flavors) == {"fedaudio", "python_function", *(["pytorch"] if export_pt2 else [])}
        pyfunc = info.flavors["python_function"]
        assert (pyfunc["loader_module"], pyfunc["data"]) == ("fedcore.serving", "serving.json")
        assert "pickle_module_name" not in pyfunc
        assert info.signature.inputs is None
        assert info.signature.outputs.input_names() == ["label", "yes", "no", "maybe"]

        served = mlflow.pyfunc.load_model(uri)
        out = served.predict(wavs)
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / model_id)))
        expected = load_classifier(local / "serving.json")
        features, _ = expected.features(wavs)
        logits = model(torch.from_numpy(features))
        assert out["label"].tolist() == [SERVING.labels[i] for i in logits.argmax(dim=1).tolist()]
        np.testing.assert_allclose(out[list(SERVING.labels)].to_numpy(),
                                   torch.softmax(logits.double(), 1).detach().numpy(), rtol=1e-6)
        assert served.predict(wavs[0])["label"].tolist() == out["label"].tolist()[:1]
        # the other ways in still work, and still unpickle nothing
        x = torch.from_numpy(features)
        assert torch.equal(load_model(uri).model(x), model(x))
        if export_pt2:
            assert torch.allclose(mlflow.pytorch.load_model(uri)(x), model(x))

    final = mlflow.pyfunc.load_model("models:/t-global@final")
    assert final.predict(wavs)["label"].tolist() == mlflow.pyfunc.load_model(f"models:/{ids[1]}").predict(
        wavs)["label"].tolist()
    tags = mlflow.MlflowClient().get_model_version("t-global", str(version)).tags
    assert tags["fedaudio.round"] == "2" and tags["fedaudio.study"] == "fedavg"
    assert tags["fedaudio.metric"] == "global_accuracy" and float(tags["fedaudio.global_accuracy"]) == 0.5
    assert tags["fedaudio.run_id"] == tracker.run_id


def test_a_tracker_without_serving_keeps_mlflows_pytorch_pyfunc(cfg: MlflowConfig, tmp_path: Path) -> None:
    tracker = FederateTracker(cfg, tmp_path, model_spec=SPEC, export_pt2=True)
    tracker.start({"federation.rounds": 1})
    model_id = tracker.log_round(1, {"global_accuracy": 0.5}, build(SPEC), SHAPE)
    info = mlflow.models.get_model_info(f"models:/{model_id}")
    assert info.flavors["python_function"]["loader_module"] == "mlflow.pytorch"
    assert not (Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / "m")))
                / "serving.json").exists()


def test_without_the_pt2_export_no_compiler_is_imported_and_the_model_loads(tmp_path: Path) -> None:
    # torch.export (and torch.load of a pt2 program) import torch's compiler stack: ~150 MB and seconds a run.
    code = """
import os, sys
from pathlib import Path
os.environ.pop("MLFLOW_TRACKING_URI", None)
import torch
from fedcore.config import MlflowConfig, ModelConfig
from fedcore.models.spec import build, classifier_spec
from tasks.tracking import FederateTracker, load_model
spec = classifier_spec(ModelConfig(name="cnn", width=2, depth=1), 3, (1, 16, 26))
cfg = MlflowConfig(tracking_uri="sqlite:///mlflow.db", experiment="t")
tracker = FederateTracker(cfg, Path("."), model_spec=spec)
tracker.start({})
tracker.prepare_export(build(spec), (1, 16, 26), "weights.safetensors")
model = build(spec).eval()
model_id = tracker.log_round(1, {"global_accuracy": 0.5}, model, (1, 16, 26))
x = torch.randn(2, 1, 16, 26)
print(torch.equal(load_model(f"models:/{model_id}").model(x), model(x)), "torch._dynamo" in sys.modules)
"""
    probe = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={k: v for k, v in os.environ.items() if k != PARENT_ENV}, check=False)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.split()[-2:] == ["True", "False"]
