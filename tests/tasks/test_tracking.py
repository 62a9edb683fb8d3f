from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from fedcore.config import MlflowConfig, ModelConfig
from fedcore.models.spec import build, classifier_spec
from tasks.tracking import (
    PARENT_ENV,
    FederateTracker,
    chart_view_tag,
    headline_metrics,
    load_model,
    run_link,
    saved_views,
    setup,
    start_parent_run,
    tracking_uri,
    ui_url,
)

#: A small registered classifier on (1, 4, 5) log-mel (conv, BatchNorm, linear): what the rounds log.
SPEC = classifier_spec(ModelConfig(name="cnn", width=2, depth=1), 3, (1, 4, 5))


@pytest.fixture()
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowConfig:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_ENV, raising=False)
    return MlflowConfig(tracking_uri="sqlite:///store/mlflow.db", experiment="t", registered_model="t-global")


def tiny_model() -> torch.nn.Module:
    return build(SPEC, torch.Generator().manual_seed(0))


def test_relative_sqlite_uri_lives_under_the_project(cfg: MlflowConfig, tmp_path: Path) -> None:
    assert tracking_uri(cfg, tmp_path) == f"sqlite:///{tmp_path / 'store/mlflow.db'}"


def test_a_new_experiment_opens_in_model_training_mode_with_links_to_its_runs(
        cfg: MlflowConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    experiment_id = setup(cfg, tmp_path)
    tags = mlflow.MlflowClient().get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    monkeypatch.setenv("FEDAUDIO_MLFLOW_UI", "http://host:5001/")
    assert run_link(experiment_id, "abc") == (
        f"[MLflow run `abc`](http://host:5001/#/experiments/{experiment_id}/runs/abc?workflowType=machine_learning)")


def test_ui_addresses_open_in_model_training_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDAUDIO_MLFLOW_UI", raising=False)
    assert ui_url() == "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    assert ui_url("7", "models", base="http://h:9/") == "http://h:9/#/experiments/7/models?workflowType=machine_learning"
    assert ui_url("7", "/runs/r1/") == "http://127.0.0.1:5000/#/experiments/7/runs/r1?workflowType=machine_learning"


def test_the_headline_metrics_are_accuracy_then_loss_in_logging_order() -> None:
    keys = ["bytes_down", "global_accuracy", "global_loss", "detect_tp", "personalised_accuracy_mean",
            "train_loss_mean", "lr"]
    assert headline_metrics(keys) == ["global_accuracy", "personalised_accuracy_mean", "global_loss",
                                      "train_loss_mean"]
    assert headline_metrics(["round_seconds", "ssl_loss", "esc10/probe_val", "mean/knn1_val"]) == [
        "mean/knn1_val", "esc10/probe_val", "ssl_loss"]  # a self-supervised run's downstream accuracies
    assert len(headline_metrics([f"a{i}_accuracy" for i in range(12)])) == 8


def test_the_saved_chart_view_is_the_envelope_mlflows_ui_reads() -> None:
    key, value = chart_view_tag("earlyexit-early_exit plan's", ["exit6_accuracy", "train_loss_mean"], 1234)
    assert key == "mlflow.sharedViewState.earlyexit-early_exit-plan-s"
    envelope = json.loads(value)
    assert (envelope["name"], envelope["createdAt"], envelope["updatedAt"]) == (
        "earlyexit-early_exit plan's: accuracy and loss first", 1234, 1234)
    state = json.loads(envelope["state"])
    assert state["searchFilter"] == "attributes.run_name = 'earlyexit-early_exit plan\\'s'"
    sections = [s["name"] for s in state["compareRunSections"]]
    assert sections == ["Accuracy and loss", "Model metrics", "System metrics"]
    assert state["isAccordionReordered"] is True  # MLflow's UI keeps the sections in this order
    charts = state["compareRunCharts"]
    assert [(c["type"], c["metricKey"], c["xAxisKey"]) for c in charts] == [
        ("LINE", "exit6_accuracy", "step"), ("LINE", "train_loss_mean", "step")]
    assert {c["metricSectionId"] for c in charts} == {state["compareRunSections"][0]["uuid"]}


def test_a_run_saves_its_chart_view_once_and_keeps_one_the_user_changed(
        cfg: MlflowConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "store").mkdir()
    monkeypatch.setenv(PARENT_ENV, start_parent_run(cfg, tmp_path, {}))
    tracker = FederateTracker(cfg, tmp_path)
    tracker.start({}, run_name="federate")
    assert tracker.view is None
    tracker.log_round(1, {"bytes_down": 1.0, "global_loss": 1.0, "global_accuracy": 0.5}, None, (1, 4, 5))
    assert tracker.view == "federate"
    assert saved_views(cfg, tmp_path, tracker.experiment_id) == ["federate"]
    client = mlflow.MlflowClient()
    held = client.get_experiment(tracker.experiment_id).tags["mlflow.sharedViewState.federate"]
    state = json.loads(json.loads(held)["state"])
    assert [c["metricKey"] for c in state["compareRunCharts"]] == ["global_accuracy", "global_loss"]
    assert ui_url(tracker.experiment_id, "runs", base="http://h:1", view=tracker.view) == (
        f"http://h:1/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning"
        "&compareRunsMode=CHART&viewStateShareKey=federate")
    client.set_experiment_tag(tracker.experiment_id, "mlflow.sharedViewState.federate", "edited in the UI")
    again = FederateTracker(cfg, tmp_path)
    again.start({}, run_name="federate")
    again.log_round(1, {"global_accuracy": 0.5}, None, (1, 4, 5))
    assert client.get_experiment(again.experiment_id).tags["mlflow.sharedViewState.federate"] == "edited in the UI"


def test_env_overrides_the_uri(cfg: MlflowConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert tracking_uri(cfg, tmp_path).endswith("other.db")


def test_rounds_models_resume_and_registration(cfg: MlflowConfig, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "store").mkdir()
    parent = start_parent_run(cfg, tmp_path, {"a.b": 1, "c.d": None})
    monkeypatch.setenv(PARENT_ENV, parent)
    tracker = FederateTracker(cfg, tmp_path, export_pt2=True)
    run_id = tracker.start({"federation.rounds": 3})
    model = tiny_model()
    first = tracker.log_round(1, {"global_accuracy": 0.5, "global_loss": 1.0}, model, (1, 4, 5))
    tracker.log_round(2, {"global_accuracy": 0.6, "global_loss": 0.9}, None, (1, 4, 5))
    assert first is not None
    tracker.fail()  # killed: the run is marked failed and resumed below

    again = FederateTracker(cfg, tmp_path, export_pt2=True)
    assert again.start({"federation.rounds": 3}, resume_run_id=run_id) == run_id
    assert again.logged_steps == {1, 2}
    assert again.model_steps == {1: first}
    # Replaying round 2 (finished but not checkpointed) must not duplicate anything.
    again.log_round(2, {"global_accuracy": 0.6, "global_loss": 0.9}, None, (1, 4, 5))
    third = again.log_round(3, {"global_accuracy": 0.7, "global_loss": 0.8}, model, (1, 4, 5))
    version = again.finish({"global_accuracy": 0.7}, 3, [])

    client = mlflow.MlflowClient()
    history = client.get_metric_history(run_id, "global_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.6), (3, 0.7)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["federation.rounds"] == "3"
    assert version == 1
    registered = client.get_model_version_by_alias("t-global", "final")
    assert int(registered.version) == 1
    assert third is not None and registered.source.endswith(third)
    # Finishing again (a resumed run that had already finished) registers nothing new.
    again_again = FederateTracker(cfg, tmp_path, export_pt2=True)
    again_again.start({"federation.rounds": 3}, resume_run_id=run_id)
    assert again_again.finish({"global_accuracy": 0.7}, 3, []) == 1
    assert len(client.search_model_versions("name = 't-global'")) == 1
    loaded = mlflow.pytorch.load_model(f"models:/{third}")
    out = loaded(torch.zeros(2, 1, 4, 5))
    assert tuple(out.shape) == (2, 3)
    rebuilt = load_model("models:/t-global@final")
    assert rebuilt.spec == SPEC and rebuilt.inputs == ("audio",)
    assert torch.equal(rebuilt.model(torch.ones(2, 1, 4, 5)), model.eval()(torch.ones(2, 1, 4, 5)))


def small_cnn() -> torch.nn.Module:
    return build(SPEC)


@pytest.mark.parametrize("prepared", [False, True])
def test_every_round_reloads_with_its_own_weights(cfg: MlflowConfig, tmp_path: Path, prepared: bool) -> None:
    """The architecture is traced once (before the rounds, or at the first); later rounds swap their weights in."""
    from fedcore.federation.checkpoint import load_state, save_state

    (tmp_path / "store").mkdir()
    tracker = FederateTracker(cfg, tmp_path, export_pt2=True)
    tracker.start({"federation.rounds": 3})
    if prepared:
        tracker.prepare_export(small_cnn(), (1, 4, 5), "weights.safetensors")
    models, ids = [], []
    for server_round in (1, 2, 3):
        model = build(SPEC, torch.Generator().manual_seed(server_round))
        model.train()(torch.randn(4, 1, 4, 5))  # move the BatchNorm statistics away from their initial values
        weights = tmp_path / f"r{server_round}" / "weights.safetensors"
        save_state(weights, model.state_dict())
        ids.append(tracker.log_round(server_round, {"global_accuracy": 0.1}, model, (1, 4, 5), weights))
        models.append(model.eval())
    x = torch.randn(3, 1, 4, 5)
    for model, model_id in zip(models, ids, strict=True):
        loaded = mlflow.pytorch.load_model(f"models:/{model_id}")
        assert torch.equal(loaded(x), model(x))
        rebuilt = load_model(f"models:/{model_id}").model  # from the spec and the safetensors weights
        assert torch.equal(rebuilt(x), model(x))
        info = mlflow.models.get_model_info(f"models:/{model_id}")
        assert set(info.flavors) == {"fedaudio", "pytorch", "python_function"}
        assert info.flavors["fedaudio"]["weights"] == "extra_files/weights.safetensors"
        assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 4, 5)
        files = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / model_id)))
        saved = load_state(files / "extra_files" / "weights.safetensors")
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
