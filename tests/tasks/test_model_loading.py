"""Models load without running code, through every stage that loads one (issue 19, item 1).

A pickled model whose unpickling plants a marker file (it stands for any code) is logged with
``mlflow.pytorch.log_model(serialization_format="pickle")`` and registered under the alias each stage loads. Every
stage refuses it with a message naming the trust option, and the marker never appears; with
``mlflow.trust_pickle: true`` the marker does appear (the payload is live). The project's own models round-trip
through MLflow (same outputs), and damaged or hostile spec/weights files are refused with a clear message.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import mlflow
import pytest
import safetensors.torch
import torch
from torch import nn

from fedcore.config import DistillConfig, EarlyExitConfig, MlflowConfig, ModalityConfig, ModelConfig, Params
from fedcore.models.spec import audio_branch_spec, av_model_spec, build, classifier_spec
from tasks.tracking import PARENT_ENV, FederateTracker, load_logged_model, load_model, setup

AUDIO = (1, 12, 16)


# ------------------------------------------------------------------------------------------------ the payload
def _plant(marker: str) -> nn.Module:
    """What unpickling a :class:`_Payload` runs: it writes ``marker``, then returns a working audio model."""
    Path(marker).touch()
    return nn.Sequential(nn.Flatten(), nn.Linear(AUDIO[1] * AUDIO[2], 3))


class _Payload(nn.Module):
    """A model whose pickle calls :func:`_plant` (a stand-in for ``os.system``)."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = str(marker)
        self.body = nn.Linear(2, 2)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _plant, (self.marker,)


@pytest.fixture()
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowConfig:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_ENV, raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    config = MlflowConfig(tracking_uri="sqlite:///mlflow.db", experiment="loading")
    setup(config, tmp_path)
    return config


def plant_pickle(cfg: MlflowConfig, root: Path, name: str, alias: str) -> tuple[Path, str]:
    """Log a pickled payload model, register it as ``name@alias``; return the marker and the model id."""
    marker = root / f"marker-{name}-{alias}"
    experiment_id = setup(cfg, root)
    with mlflow.start_run(experiment_id=experiment_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's own warnings (pickle, type hints)
        info = mlflow.pytorch.log_model(_Payload(marker), name="payload", serialization_format="pickle",
                                        pip_requirements=["torch"])  # given: no requirement inference (no load)
        version = mlflow.register_model(f"models:/{info.model_id}", name)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    assert not marker.exists()  # logging and registering never unpickled it
    return marker, str(info.model_id)


def _params(cfg: MlflowConfig, trust: bool, **sections: object) -> Params:
    mlflow_cfg = MlflowConfig(tracking_uri=cfg.tracking_uri, experiment=cfg.experiment, trust_pickle=trust)
    return Params(mlflow=mlflow_cfg, **sections)  # type: ignore[arg-type]


AV = av_model_spec(ModelConfig(name="cnn", width=2, depth=1), ModalityConfig(embed_dim=4, hidden_dim=4,
                                                                            visual_width=2), AUDIO, (1, 8, 8), 3)


def log_ours(cfg: MlflowConfig, root: Path, name: str, spec_name: str = "av") -> nn.Module:
    """Log one of the project's models (spec + safetensors) and register it as ``name@final``."""
    spec = {"av": AV, "branch": audio_branch_spec(AV),
            "classifier": classifier_spec(ModelConfig(name="cnn", width=2, depth=1), 3, AUDIO)}[spec_name]
    inputs = ("audio", "visual") if spec_name == "av" else ("audio",)
    model = build(spec, torch.Generator().manual_seed(7))
    tracker = FederateTracker(MlflowConfig(tracking_uri=cfg.tracking_uri, experiment=cfg.experiment,
                                           registered_model=name), root, model_inputs=inputs, model_spec=spec)
    tracker.start({}, run_name=f"log-{name}")
    tracker.log_round(1, {"accuracy": 0.5}, model, AUDIO)
    tracker.finish({}, 1, [])
    return model.eval()


# ------------------------------------------------------------------------------------------------ every stage
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_distill_refuses_a_pickled_teacher_or_student(cfg: MlflowConfig, tmp_path: Path, which: str) -> None:
    from flows.distill import DistillPaths, distillation

    pickled, ours = ("fedaudio-av", "fedaudio-av-audio") if which == "teacher" else ("fedaudio-av-audio",
                                                                                      "fedaudio-av")
    marker, _ = plant_pickle(cfg, tmp_path, pickled, "final")
    log_ours(cfg, tmp_path, ours, "av" if which == "student" else "branch")
    paths = DistillPaths(features=tmp_path / "no-features", checkpoints=tmp_path / "ck", root=tmp_path)
    params = _params(cfg, False, distill=DistillConfig(teacher="models:/fedaudio-av@final",
                                                      student="models:/fedaudio-av-audio@final"))
    with pytest.raises(ValueError, match=rf"'models:/{pickled}@final'.*must be a model with an architecture spec.*"
                                         r"trust_pickle: true"):
        distillation.fn(params, paths)
    assert not marker.exists()

    trusting = _params(cfg, True, distill=params.distill)
    with pytest.raises(Exception) as error:  # the models load; then the data is missing
        distillation.fn(trusting, paths)
    assert "trust_pickle" not in str(error.value)
    assert marker.exists()  # the payload is live: trust_pickle runs it


def test_select_verify_refuses_a_pickled_encoder(cfg: MlflowConfig, tmp_path: Path) -> None:
    from fedcore.evaluation.selection import TaskSelection
    from flows.select import _verify
    from tasks.selection import load_selected

    marker, _ = plant_pickle(cfg, tmp_path, "fedaudio-fassl", "digit")
    selection = TaskSelection(task="digit", metric="knn1", best_round=1, best_val=0.5, best_test=0.5, last_round=1,
                              last_val=0.5, last_test=0.5, floor_test=0.1)
    with pytest.raises(ValueError, match=r"'models:/fedaudio-fassl@digit'.*flavours \['python_function', "
                                         r"'pytorch'\], serialised as \['pickle'\].*trust_pickle"):
        _verify(_params(cfg, False), [selection], "fedaudio-fassl", tmp_path / "no-downstream")
    with pytest.raises(ValueError, match="trust_pickle"):
        load_selected("fedaudio-fassl", "digit")
    assert not marker.exists()

    model = load_selected("fedaudio-fassl", "digit", trust_pickle=True)
    assert marker.exists()
    assert model(torch.zeros(2, *AUDIO)).shape == (2, 3)


def test_earlyexit_init_refuses_a_pickled_model(cfg: MlflowConfig, tmp_path: Path) -> None:
    from tasks.earlyexit import initial_state

    marker, _ = plant_pickle(cfg, tmp_path, "pretrained", "final")
    early = EarlyExitConfig(init="models:/pretrained@final", exits=[1, 2], tiers=[{"share": 1.0, "depth": 2}])
    model_cfg = ModelConfig(name="transformer", width=8, depth=2)
    with pytest.raises(ValueError, match=r"'models:/pretrained@final'.*trust_pickle"):
        initial_state(_params(cfg, False, earlyexit=early, model=model_cfg), 3, AUDIO, tmp_path)
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017  (loaded, then its weights do not fit the backbone)
        initial_state(_params(cfg, True, earlyexit=early, model=model_cfg), 3, AUDIO, tmp_path)
    assert marker.exists()


def test_every_uri_form_of_a_pickled_model_is_refused(cfg: MlflowConfig, tmp_path: Path) -> None:
    marker, model_id = plant_pickle(cfg, tmp_path, "evil", "final")
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / "copy")))
    for uri in ("models:/evil@final", "models:/evil/1", f"models:/{model_id}", str(folder), folder.as_uri()):
        with pytest.raises(ValueError, match="must be a model with an architecture spec"):
            load_model(uri)
        with pytest.raises(ValueError, match="trust_pickle"):
            load_logged_model(uri)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ our models
@pytest.mark.parametrize("kind", ["av", "branch", "classifier"])
def test_our_models_round_trip_through_the_registry(cfg: MlflowConfig, tmp_path: Path, kind: str) -> None:
    model = log_ours(cfg, tmp_path, f"ours-{kind}", kind)
    loaded = load_model(f"models:/ours-{kind}@final")
    g = torch.Generator().manual_seed(0)
    audio, visual = torch.randn(4, *AUDIO, generator=g), torch.rand(4, 1, 8, 8, generator=g)
    args = (audio, visual) if kind == "av" else (audio,)
    assert loaded.inputs == (("audio", "visual") if kind == "av" else ("audio",))
    with torch.no_grad():
        assert torch.equal(loaded.model(*args), model(*args))
    assert isinstance(loaded.model, nn.Module) and all(p.requires_grad for p in loaded.model.parameters())
    files = Path(mlflow.artifacts.download_artifacts(f"models:/ours-{kind}@final", dst_path=str(tmp_path / "f")))
    assert {"MLmodel", "model_spec.json", "weights.safetensors"} <= {p.name for p in files.iterdir()}
    assert not any(p.suffix in (".pkl", ".pth", ".pt") for p in files.rglob("*"))  # nothing pickled
    teacher, inputs = load_logged_model(f"models:/ours-{kind}@final")  # the distill stage's call
    assert inputs == loaded.inputs and isinstance(teacher, nn.Module)


# ------------------------------------------------------------------------------------------------ bad files
@pytest.fixture()
def copy(cfg: MlflowConfig, tmp_path: Path) -> Path:
    """A local copy of one of our logged models (the files a hostile store could hold)."""
    log_ours(cfg, tmp_path, "base", "classifier")
    return Path(mlflow.artifacts.download_artifacts("models:/base@final", dst_path=str(tmp_path / "copy")))


def _edit_spec(folder: Path, **changes: object) -> None:
    raw = json.loads((folder / "model_spec.json").read_text())
    raw.update(changes)
    (folder / "model_spec.json").write_text(json.dumps(raw))


def _edit_flavour(folder: Path, **changes: object) -> None:
    import yaml

    raw = yaml.safe_load((folder / "MLmodel").read_text())
    raw["flavors"]["fedaudio"].update(changes)
    (folder / "MLmodel").write_text(yaml.safe_dump(raw))


def test_a_spec_naming_an_unknown_architecture_is_refused(copy: Path) -> None:
    _edit_spec(copy, architecture="subprocess")
    with pytest.raises(ValueError, match=r"model_spec.json: 'architecture' must be one of audio_branch, av_model, "
                                         r"classifier, early_exit, ssl_model. Got 'subprocess'"):
        load_model(str(copy))


def test_weights_of_a_wrong_shape_are_refused(copy: Path) -> None:
    state = safetensors.torch.load_file(copy / "weights.safetensors")
    state["classifier.weight"] = torch.zeros(7, state["classifier.weight"].shape[1])
    safetensors.torch.save_file(state, copy / "weights.safetensors")
    with pytest.raises(ValueError, match=r"must match the architecture of the spec exactly; 1 entries of another "
                                         r"shape or dtype \('classifier.weight': F32\[7, "):
        load_model(str(copy))


def test_truncated_weights_are_refused_in_the_store(cfg: MlflowConfig, tmp_path: Path) -> None:
    log_ours(cfg, tmp_path, "cut", "classifier")
    location = mlflow.MlflowClient().get_model_version_download_uri("cut", "1")
    weights = Path(location.removeprefix("file://")) / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # the store itself holds the damaged file
    with pytest.raises(ValueError, match=r"'models:/cut@final': weights: the header declares \d+ bytes of tensor "
                                         r"data; the file holds \d+ \(truncated\)"):
        load_model("models:/cut@final")


@pytest.mark.parametrize(("change", "message"), [
    ({"weights": "../../../../etc/passwd"}, "'weights' must be a relative file name inside the model folder"),
    ({"weights": "/etc/passwd"}, "'weights' must be a relative file name"),
    ({"spec": "missing.json"}, "the model folder must hold 'missing.json'"),
    ({"inputs": ["audio", "keyboard"]}, "'inputs' must name audio and/or visual"),
    ({"inputs": []}, "'inputs' must name audio and/or visual"),
    ({"format_version": 99}, "must have format_version 1"),
])
def test_a_bad_flavour_is_refused(copy: Path, change: dict[str, object], message: str) -> None:
    _edit_flavour(copy, **change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model(str(copy))


def test_a_symlinked_or_oversized_file_is_refused(copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.safetensors"
    shutil.copy(copy / "weights.safetensors", outside)
    (copy / "weights.safetensors").unlink()
    (copy / "weights.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="must be a regular file inside the model folder"):
        load_model(str(copy))
    (copy / "weights.safetensors").unlink()
    shutil.copy(outside, copy / "weights.safetensors")
    (copy / "model_spec.json").write_text(" " * 70_000 + "{}")
    with pytest.raises(ValueError, match=r"'model_spec.json' must be at most 65536 bytes. Got 70002"):
        load_model(str(copy))


def test_an_mlmodel_that_is_not_yaml_or_has_no_flavours_is_refused(copy: Path) -> None:
    (copy / "MLmodel").write_text("flavors: [unclosed")
    with pytest.raises(ValueError, match="its MLmodel must be YAML"):
        load_model(str(copy))
    (copy / "MLmodel").write_text("!!python/object/apply:os.system ['touch x']")
    with pytest.raises(ValueError, match="its MLmodel must be YAML"):  # safe_load builds no object
        load_model(str(copy))
    (copy / "MLmodel").write_text("flavors: 3")
    with pytest.raises(ValueError, match="must have a 'flavors' mapping"):
        load_model(str(copy))
    # aliases nesting 9^30 leaves: refused at once, never expanded into a message
    laughs = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 31)]
    for field in ("spec", "inputs", "format_version"):
        flavour = {"spec": "model_spec.json", "weights": "weights.safetensors", "inputs": ["audio"],
                   "format_version": 1}
        body = "\n".join(f"    {k}: {'*a30' if k == field else json.dumps(v)}" for k, v in flavour.items())
        (copy / "MLmodel").write_text("\n".join(laughs) + f"\nflavors:\n  fedaudio:\n{body}\n")
        with pytest.raises(ValueError, match=r"Got (a list|\[.a list)"):
            load_model(str(copy))


def test_unknown_names_and_folders_are_refused(cfg: MlflowConfig, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'models:/nobody@final': cannot be resolved.*Fix: check the name"):
        load_model("models:/nobody@final")
    with pytest.raises(ValueError, match="must be a models:/ URI or a model folder. Got no folder"):
        load_model(str(tmp_path / "nothing"))


# ------------------------------------------------------------------------------------------------ earlyexit files
def test_earlyexit_init_files(tmp_path: Path) -> None:
    from tasks.earlyexit import read_weights

    state = {"net.weight": torch.ones(2, 2)}
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"is a torch pickle \(.pt/.pth\).*trust_pickle: true'. Fix: convert it "
                                         r"to safetensors once.*st.save_file"):
        read_weights("w.pt", tmp_path)
    assert torch.equal(read_weights("w.pt", tmp_path, trust_pickle=True)["net.weight"], state["net.weight"])
    safetensors.torch.save_file(state, tmp_path / "w.safetensors")
    assert torch.equal(read_weights("w.safetensors", tmp_path)["net.weight"], state["net.weight"])
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_weights("cut.safetensors", tmp_path)
    safetensors.torch.save_file({"net.weight": torch.full((2, 2), float("nan"))}, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="must be finite"):
        read_weights("nan.safetensors", tmp_path)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"must be a .safetensors \(or, trusted, .pt/.pth\) file"):
        read_weights("w.bin", tmp_path)


# ------------------------------------------------------------------------------------------------ specs = stages
@pytest.mark.parametrize("ssl", ["none", "simclr", "byol"])
def test_the_federate_spec_is_the_model_the_stage_trains(ssl: str) -> None:
    from fedcore.config import SSLConfig
    from fedcore.models.spec import federate_model_spec
    from fedcore.plans.supervised import fresh_model, make_spec

    params = Params(model=ModelConfig(name="cnn", width=2, depth=2), ssl=SSLConfig(method=ssl, projector_dim=4))
    spec = make_spec(params, 3, 5, AUDIO, 1)
    trained = fresh_model(spec, 4)
    logged = build(federate_model_spec(spec.model, spec.ssl, spec.num_classes, spec.input_shape),
                   torch.Generator().manual_seed(4))
    assert type(logged) is type(trained)
    assert all(torch.equal(logged.state_dict()[k], v) for k, v in trained.state_dict().items())
    assert logged.state_dict().keys() == trained.state_dict().keys()


def test_the_modality_and_earlyexit_specs_are_the_models_the_stages_train() -> None:
    from tasks import earlyexit, modality

    params = Params(model=ModelConfig(name="transformer", width=8, depth=2),
                    modality=ModalityConfig(embed_dim=4, hidden_dim=4, visual_width=2, fusion="attention"),
                    earlyexit=EarlyExitConfig(exits=[1, 2], tiers=[{"share": 1.0, "depth": 2}]))
    data = modality.AVData(train=[], test=None, num_classes=3, audio_shape=AUDIO, visual_shape=(1, 8, 8),  # type: ignore[arg-type]
                           video=[])
    pairs = [(modality.new_model(params, data, 9), modality.new_model_spec(params, data)),
             (earlyexit.new_model(params, 3, AUDIO, 9), earlyexit.new_model_spec(params, 3, AUDIO))]
    for trained, spec in pairs:
        logged = build(spec, torch.Generator().manual_seed(9))
        assert logged.state_dict().keys() == trained.state_dict().keys()
        assert all(torch.equal(logged.state_dict()[k], v) for k, v in trained.state_dict().items())
