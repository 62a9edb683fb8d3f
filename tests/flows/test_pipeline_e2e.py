"""End to end on real audio: the pipeline flow drives `dvc repro`; resume after a kill; `dvc exp run -S`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.rounds import read_run_record
from tests.flows.conftest import dvc_executable, make_project, run, stage_env, tiny_params

pytestmark = pytest.mark.integration

ACCURACY_KEYS = ("global_accuracy", "global_loss", "personalised_accuracy_mean", "personalised_accuracy_worst10",
                 "best_global_accuracy", "best_round", "rounds")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, small_mirror: Path, prefect_api: str) -> Path:
    root = make_project(tmp_path_factory.mktemp("e2e") / "project", tiny_params(small_mirror))
    env = dict(stage_env(prefect_api), PREFECT_LOGGING_LEVEL="INFO")  # Prefect's default: what a user sees
    result = run([sys.executable, "-m", "flows.pipeline"], root, env, timeout=900)
    assert "pipeline finished" in result.stdout, result.stdout + result.stderr
    (root / "pipeline.log").write_text(result.stdout + result.stderr)
    return root


def test_the_terminal_shows_each_stage_and_no_http_chatter(project: Path) -> None:
    output = (project / "pipeline.log").read_text()
    assert "repro federate: ran" in output, output[-3000:]
    assert "Running stage 'federate'" in output
    chatter = [line for line in output.splitlines() if "HTTP Request" in line or "httpx" in line]
    assert not chatter, chatter[:5]
    # a stage's log line once re-logged by its repro task carries one time and level, not two
    nested = [line for line in output.splitlines() if re.search(r" - \d\d:\d\d:\d\d\.\d+ \| ", line)]
    assert not nested, nested[:5]


def logged_models(root: Path) -> list[object]:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("fedaudio")
    return mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")


def test_pipeline_writes_every_stage_output(project: Path) -> None:
    for path in ["data/raw/manifest.csv", "data/raw/report.json", "data/features/features.npy",
                 "data/features/index.csv", "data/partition/partition.json", "data/partition/heatmap.png",
                 "data/poison/ground_truth.json", "models/global.safetensors", "plots/federate/rounds.tsv",
                 "plots/federate/rounds.png", "dvc.lock"]:
        assert (project / path).exists(), path
    metrics = json.loads((project / "metrics/federate.json").read_text())
    assert metrics["rounds"] == 2
    assert 0.0 <= metrics["global_accuracy"] <= 1.0
    report = json.loads((project / "data/raw/report.json").read_text())
    assert report["num_ok"] == 180


def test_mlflow_holds_one_model_per_round_and_registers_the_final(project: Path) -> None:
    import mlflow

    models = logged_models(project)
    rounds = sorted(int(m.tags["fedaudio.round"]) for m in models)
    assert rounds == [1, 2]
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("fedaudio-global", "final")
    assert int(version.version) == 1
    run_info = client.get_run(read_run_record(project / "metrics/federate.json")["mlflow_run_id"])
    history = client.get_metric_history(run_info.info.run_id, "global_accuracy")
    assert [m.step for m in history] == [1, 2]
    parent = client.get_run(run_info.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["fedaudio.kind"] == "pipeline"
    assert parent.data.params["partition.num_clients"] == "3"


#: Run in a fresh process, outside the project: what a user with the MLflow store and some WAV files runs.
CLASSIFY_WAVS = """
import json, sys
import mlflow
model = mlflow.pyfunc.load_model("models:/fedaudio-global@final")
out = model.predict(json.loads(sys.argv[1]))
print(json.dumps({"labels": out["label"].tolist(), "columns": list(out.columns),
                  "loader": sys.modules["fedcore.serving"].__file__,
                  "project_modules": sorted({m.split(".")[0] for m in sys.modules} & {"tasks", "flows"})}))
"""


def test_the_registered_model_classifies_test_wavs_as_the_pipelines_evaluation(project: Path,
                                                                               tmp_path: Path) -> None:
    """Issue 22: mlflow.pyfunc loads the final model without the data folder and predicts FSDD's test WAV files
    exactly as the federate stage's evaluation does (per-clip labels, and so its accuracy)."""
    import csv

    import mlflow

    from fedcore.data.features import FeatureStore
    from fedcore.data.federated import load_federated_data
    from fedcore.evaluation.metrics import evaluate, predict
    from tasks.tracking import load_model

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("fedaudio-global", "final")
    tags = version.tags
    final_round = int(tags["fedaudio.round"])
    assert tags["fedaudio.metric"] == "global_accuracy" and tags["fedaudio.study"] == "fedavg"
    assert tags["fedaudio.run_id"] == version.run_id
    logged = {m.step: m.value for m in client.get_metric_history(version.run_id, "global_accuracy")}
    assert float(tags["fedaudio.global_accuracy"]) == logged[final_round]

    # The pipeline's own evaluation of that model: the federate stage's test rows, through fedcore's evaluate.
    params = yaml.safe_load((project / "params.yaml").read_text())
    data = load_federated_data(project / "data/features", project / "data/partition/partition.json",
                               project / "data/poison")
    model = load_model("models:/fedaudio-global@final").model  # the stages' safe loader
    batch = params["federation"]["eval_batch_size"]
    assert evaluate(model, data.test.features, data.test.labels, batch)["accuracy"] == logged[final_round]
    store = FeatureStore.load(project / "data/features")
    expected = [store.label_names[i] for i in predict(model, data.test.features, batch).argmax(dim=1).tolist()]
    truth = [store.label_names[i] for i in data.test.labels.tolist()]

    # The same clips as WAV files outside the project, whose data folder is then moved away.
    test_rows = json.loads((project / "data/partition/partition.json").read_text())["test"]
    with open(project / "data/raw/manifest.csv", newline="") as handle:
        path_of = {row["id"]: row["path"] for row in csv.DictReader(handle)}
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    files = []
    for row in test_rows:
        source = project / "data/raw" / path_of[store.ids[row]]
        shutil.copy(source, wavs / source.name)
        files.append(str(wavs / source.name))
    assert len(files) == len(expected) > 0
    away = project.parent / "data-moved-away"
    (project / "data").rename(away)
    try:
        env = {**stage_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
        result = run([sys.executable, "-c", CLASSIFY_WAVS, json.dumps(files)], tmp_path, env, timeout=300)
    finally:
        away.rename(project / "data")
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert not Path(served["loader"]).resolve().is_relative_to(project.resolve())  # the installed package
    assert served["project_modules"] == []
    assert served["columns"] == ["label", *store.label_names]
    assert served["labels"] == expected
    accuracy = sum(a == b for a, b in zip(served["labels"], truth, strict=True)) / len(truth)
    assert accuracy == logged[final_round]


def test_second_repro_does_nothing(project: Path) -> None:
    lock_before = (project / "dvc.lock").read_text()
    result = run([dvc_executable(), "repro"], project)
    assert "Running stage" not in result.stdout
    assert (project / "dvc.lock").read_text() == lock_before


@pytest.mark.parametrize(("change", "message"), [
    ("lose_section", "Parameters 'fedprox' are missing"),
    ("inf_lr", "federation: 'lr' must be a finite number"),
])
def test_invalid_params_fail_before_any_output_is_removed(project: Path, change: str, message: str) -> None:
    """DVC removes a stale stage's outputs before running it: the check stage validates first, so nothing goes."""
    outputs = ["metrics/federate.json", "models/global.safetensors", "data/features/features.npy",
               "data/partition/partition.json", "plots/federate/rounds.tsv"]
    before = {path: (project / path).read_bytes() for path in outputs}
    params_file = project / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    if change == "lose_section":
        del params["fedprox"]
    else:
        params["federation"]["lr"] = float("inf")
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = run([dvc_executable(), "repro"], project, check=False)
    finally:
        params_file.write_text(original)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Running stage 'federate'" not in result.stdout
    assert {path: (project / path).read_bytes() for path in outputs} == before


def test_dvc_metrics_show_prints_the_headline(project: Path) -> None:
    """The study's DVC metrics are its headline, under its name; the stage summary stays a plain output."""
    result = run([dvc_executable(), "metrics", "show"], project)
    assert "fedavg.accuracy" in result.stdout and "fedavg.best_accuracy" in result.stdout
    assert "global_loss" not in result.stdout
    summary = json.loads((project / "metrics/federate.json").read_text())
    headline = json.loads((project / "metrics/headline.json").read_text())
    assert headline == {"fedavg": {"accuracy": summary["global_accuracy"],
                                   "best_accuracy": summary["best_global_accuracy"]}}


def test_exp_run_with_a_changed_param(project: Path, prefect_api: str) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results"], project)
    run([dvc_executable(), "exp", "run", "-S", "federation.rounds=3"], project, stage_env(prefect_api), timeout=900)
    metrics = json.loads((project / "metrics/federate.json").read_text())
    assert metrics["rounds"] == 3
    shown = run([dvc_executable(), "exp", "show", "--no-pager", "--md"], project).stdout
    assert "federation.rounds" in shown
    # DVC fits the table to the terminal, hiding what does not fit behind "…": at 120 columns nothing is hidden
    changed = run([dvc_executable(), "exp", "show", "--no-pager", "--only-changed"], project,
                  {**stage_env(), "COLUMNS": "120"}).stdout
    assert "federation.rounds" in changed and "fedavg.accuracy" in changed and "fedavg.best_accuracy" in changed
    assert "…" not in changed, changed


def test_killed_federate_resumes_to_the_same_metrics(project: Path, prefect_api: str) -> None:
    env = stage_env(prefect_api)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["federation"]["rounds"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # Uninterrupted reference, written beside the stage's outputs.
    run([sys.executable, "-m", "flows.federate", "--checkpoints", "ref/ckpt", "--model", "ref/model.safetensors",
         "--metrics", "ref/metrics.json", "--plots", "ref/plots"], project, env, timeout=900)
    reference = json.loads((project / "ref/metrics.json").read_text())

    latest = project / "checkpoints/federate/latest.json"
    shutil.rmtree(project / "checkpoints/federate", ignore_errors=True)  # only the new run's checkpoints count
    process = subprocess.Popen([dvc_executable(), "repro", "federate"], cwd=project, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    killed_after = None
    while time.monotonic() < deadline and process.poll() is None:
        if latest.exists():
            state = json.loads(latest.read_text())
            if state.get("round", 0) >= 2:
                os.killpg(process.pid, signal.SIGKILL)
                killed_after = state["round"]
                break
        time.sleep(0.2)
    process.wait(timeout=60)
    assert killed_after is not None and killed_after < 5, "the run finished before it could be killed"

    result = run([dvc_executable(), "repro"], project, env, timeout=900)
    assert "resuming after round" in result.stdout + result.stderr
    resumed = json.loads((project / "metrics/federate.json").read_text())
    assert {k: resumed[k] for k in ACCURACY_KEYS} == {k: reference[k] for k in ACCURACY_KEYS}
    # the per-round detection log is the same file, whether its rounds came from a checkpoint or from memory
    detection = (project / "plots/federate/detection.json").read_text()
    assert detection == (project / "ref/plots/detection.json").read_text()


def test_the_readme_python_block_loads_the_final_model(project: Path) -> None:
    """The README's python block, pasted as is in the project folder, loads the registered final model."""
    from tests.test_readme import python_blocks

    (block,) = python_blocks()
    result = run([sys.executable, "-c", block + "\nprint('loaded', type(model).__name__)"], project, stage_env())
    assert "loaded PyFuncModel" in result.stdout, result.stdout + result.stderr
    assert "label" in result.stdout, result.stdout  # it classified the WAV: a label and the class probabilities


def test_the_prefect_run_names_stages_clients_and_rounds_and_links_its_stage_runs(project: Path,
                                                                                   prefect_api: str) -> None:
    """Read back from the Prefect API: the pipeline run's tasks are `repro <stage>`, each stage's flow run carries
    the pipeline run's tag (and is listed in its summary), the federate run's tasks are `train client c round r`."""
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    from flows.pipeline import pipeline_tag, stage_runs

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    (parent,) = mlflow.search_runs(experiment_names=["fedaudio"], filter_string="tags.`fedaudio.study` = 'fedavg'",
                                   output_format="list")
    pipeline_run = parent.data.tags["prefect.flow_run_id"]

    def task_names(flow_run_id: str) -> list[str]:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(task_run_filter=TaskRunFilter(
                flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
        return sorted(run.name for run in runs)

    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert task_names(pipeline_run) == sorted(f"repro {name}" for name in stages)
    runs = stage_runs(pipeline_run)
    assert [r["stage"] for r in runs] == ["download", "features", "partition", "poison", "federate"]
    assert {r["state"] for r in runs} == {"Completed"}
    with get_client(sync_client=True) as client:
        assert all(pipeline_tag(pipeline_run) in client.read_flow_run(r["id"]).tags for r in runs)
    federate = next(r["id"] for r in runs if r["stage"] == "federate")
    trained = [name for name in task_names(federate) if name.startswith("train client")]
    assert sorted(trained) == sorted(f"train client {c} round {r}" for c in range(3) for r in (1, 2))
