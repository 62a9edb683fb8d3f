"""The Prefect deployment of prefect.yaml runs what it says: an override is what DVC, Prefect and MLflow record.

Real components throughout: a temporary Prefect server, the deployment registered by ``prefect deploy`` from this
project's prefect.yaml, a process worker that runs it, ``run_deployment``, a git + DVC project on real FSDD clips
and its MLflow store.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.rounds import read_run_record
from tests.conftest import stop_group
from tests.flows.conftest import REPO_ROOT, make_project, run, stage_env, tiny_params

pytestmark = pytest.mark.integration

DEPLOYMENT = "pipeline/fedaudio-pipeline"


def prefect_cli() -> str:
    return str(Path(sys.executable).with_name("prefect"))


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, small_mirror: Path, prefect_api: str) -> Iterator[Path]:
    """A project whose prefect.yaml deployment is registered on the test server and served by a process worker."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    root = make_project(tmp_path_factory.mktemp("deploy") / "project",
                        tiny_params(small_mirror, federation={"local_epochs": 1}, model={"width": 4}))
    pool = yaml.safe_load((root / "prefect.yaml").read_text())["deployments"][0]["work_pool"]["name"]
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    env = stage_env(prefect_api)
    env.update(PWD=str(root), PREFECT_HOME=str(tmp_path_factory.mktemp("prefect_home")),
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true")
    run([prefect_cli(), "--no-prompt", "deploy", "--all"], root, env, timeout=300)
    log = (root.parent / "worker.log").open("w")
    worker = subprocess.Popen([prefect_cli(), "worker", "start", "--pool", pool], cwd=root, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield root
    finally:
        stop_group(worker)
        log.close()


def run_and_wait(root: Path, parameters: dict[str, Any], api: str) -> Any:
    """The README's ``prefect deployment run`` (``--param name=<json>`` per parameter), watched to its end."""
    from prefect.client.orchestration import get_client

    params = [arg for name, value in parameters.items() for arg in ("--param", f"{name}={json.dumps(value)}")]
    shown = run([prefect_cli(), "--no-prompt", "deployment", "run", DEPLOYMENT, *params, "--watch",
                 "--watch-interval", "1", "--watch-timeout", "600"], root, stage_env(api), timeout=660, check=False)
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", shown.stdout)
    assert found, shown.stdout + shown.stderr
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(found.group(1))
    worker_log = (root.parent / "worker.log").read_text()
    assert flow_run.state is not None and flow_run.state.is_completed(), f"{flow_run.state}\n{worker_log[-6000:]}"
    return flow_run


def parent_run(root: Path, flow_run_id: str) -> Any:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedaudio")
    (found,) = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    return client, found


def test_a_deployment_override_is_recorded_alike_by_dvc_prefect_and_mlflow(deployed: Path, prefect_api: str) -> None:
    root = deployed
    params_before = (root / "params.yaml").read_text()
    started = time.monotonic()
    baseline = run_and_wait(root, {}, prefect_api)  # the deployment's own parameters: params.yaml as it is (2 rounds)
    baseline_s = time.monotonic() - started
    baseline_metrics = json.loads((root / "metrics/federate.json").read_text())
    assert baseline_metrics["rounds"] == 2

    started = time.monotonic()
    changed = run_and_wait(root, {"run": {"rounds": 1}}, prefect_api)
    changed_s = time.monotonic() - started
    print(f"deployment runs: baseline {baseline_s:.1f} s, with the override {changed_s:.1f} s")

    # DVC: the stage ran with the override and recorded it
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["federate"]["params"]["params.yaml"]["federation"]["rounds"] == 1
    # Prefect: the flow run's parameters
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_flow_run(changed.id).parameters["run"]["rounds"] == 1
    # MLflow: the parent run of this flow run, and the federate run under it
    mlflow_client, parent = parent_run(root, str(changed.id))
    assert parent.data.params["federation.rounds"] == "1"
    assert parent.data.tags["fedaudio.overrides"] == "federation.rounds=1"
    federate_run = read_run_record(root / "metrics/federate.json")["mlflow_run_id"]
    assert mlflow_client.get_run(federate_run).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent_run(root, str(baseline.id))[1].data.params["federation.rounds"] == "2"
    # a different result, and params.yaml as it was
    metrics = json.loads((root / "metrics/federate.json").read_text())
    assert metrics["rounds"] == 1 and metrics != baseline_metrics
    assert (root / "params.yaml").read_text() == params_before
    status = run([str(Path(sys.executable).with_name("dvc")), "status", "federate"], root, stage_env()).stdout
    assert "modified:" in status and "federation" in status  # the outputs are the override's, not params.yaml's


def test_an_invalid_override_fails_the_run_before_any_stage(tmp_path: Path, prefect_api: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcore.errors import ConfigError
    from flows.pipeline import pipeline
    from tasks.studies import PipelineRun

    for name in ("params.yaml", "dvc.yaml"):
        (tmp_path / name).write_bytes((REPO_ROOT / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="federation: 'lr' must be > 0"):
        pipeline(PipelineRun(set=["federation.lr=-1"]))
    assert (tmp_path / "params.yaml").read_bytes() == (REPO_ROOT / "params.yaml").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dvc", "dvc.yaml", "params.yaml"]  # no stage ran


def test_the_deployment_form_is_the_typed_described_run_request() -> None:
    from flows.pipeline import pipeline
    from tasks.studies import PipelineRun

    schema = pipeline.parameters.model_dump()
    assert list(schema["properties"]) == ["run"]
    form = schema["definitions"]["PipelineRun"]["properties"]
    assert form["rounds"]["description"].endswith("Sets `federation.rounds`; empty: the params file's value.")
    assert "params_file" not in form
    deployment = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"][0]
    assert set(deployment["parameters"]) == {"run"}
    assert PipelineRun(**deployment["parameters"]["run"]).overrides() == []
