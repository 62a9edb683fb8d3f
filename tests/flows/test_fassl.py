"""Federated SSL end to end on real audio: every round scored per task, logged with its model, selected per task,
registered under an alias that reloads to the logged score; a killed run resumes to the same result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fedcore.federation.checkpoint import load_state
from fedcore.federation.client_store import ClientStore
from flows import download, features, federate, partition, select
from tasks.common import read_params
from tasks.rounds import read_run_record
from tasks.tracking import tracking_uri
from tests.flows.conftest import tiny_params
from tests.flows.test_stages import _kill_at_round, _Killed

pytestmark = pytest.mark.integration

TASKS = [{"name": "fsdd_digit", "dataset": "fsdd", "label": "label"},
         {"name": "fsdd_speaker", "dataset": "fsdd", "label": "speaker"}]


@pytest.fixture(scope="module")
def sslwork(tmp_path_factory: pytest.TempPathFactory, small_mirror: Path, prefect_api: str) -> Path:
    """The small real FSDD archive as a downstream feature store (downstream/fsdd), partitioned over 3 clients."""
    root = tmp_path_factory.mktemp("fassl")
    p = str(_write(root / "params.yaml", tiny_params(small_mirror)))
    assert download.main(["--params", p, "--out", str(root / "raw"), "--downloads", str(root / "dl")]) == 0
    assert features.main(["--params", p, "--raw", str(root / "raw"), "--out", str(root / "downstream/fsdd")]) == 0
    assert partition.main(["--params", p, "--features", str(root / "downstream/fsdd"), "--out",
                           str(root / "part")]) == 0
    return root


def _write(path: Path, params: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _ssl_params(mirror: Path, method: str, **federation: object) -> dict[str, object]:
    return tiny_params(mirror, ssl={"method": method}, model={"width": 4, "depth": 2},
                       federation={"batch_size": 16, "local_epochs": 1, **federation},
                       downstream={"tasks": TASKS, "ks": [1, 3], "registered_model": f"enc-{method}"})


def _args(p: str, name: str) -> list[str]:
    return ["--params", p, "--features", "downstream/fsdd", "--partition", "part/partition.json", "--poison",
            "no-poison", "--downstream", "downstream", "--checkpoints", f"ckpt-{name}", "--model", f"{name}.st",
            "--metrics", f"{name}.json", "--plots", f"plots-{name}"]


def test_every_round_is_scored_and_each_task_gets_its_best_round_under_an_alias(
        sslwork: Path, small_mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.chdir(sslwork)
    p = str(_write(sslwork / "simclr.yaml", _ssl_params(small_mirror, "simclr", rounds=2)))
    assert federate.main(_args(p, "simclr")) == 0
    metrics = json.loads((sslwork / "simclr.json").read_text())
    for task in ("fsdd_digit", "fsdd_speaker"):
        for key in ("knn1_val", "knn1_test", "knn3_val", "knn3_test"):
            assert 0.0 <= metrics[f"{task}/{key}"] <= 1.0
            assert 0.0 <= metrics["floor"][f"{task}/{key}"] <= 1.0
    header = (sslwork / "plots-simclr/rounds.tsv").read_text().splitlines()[0].split("\t")
    assert "fsdd_digit/knn1_val" in header and "global_accuracy" not in header

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(read_params(p).mlflow, sslwork))
    run_id = read_run_record(sslwork / "simclr.json")["mlflow_run_id"]
    models = {int(m.tags["fedaudio.round"]): m.model_id for m in mlflow.search_logged_models(
        experiment_ids=[client.get_run(run_id).info.experiment_id], filter_string=f"source_run_id = '{run_id}'",
        output_format="list")}
    assert sorted(models) == [0, 1, 2]  # round 0 is the random-init encoder (the floor)
    history = client.get_metric_history(run_id, "fsdd_digit/knn1_test")
    assert [m.step for m in history] == [0, 1, 2]
    for m in history:  # each round's scores are linked to that round's LoggedModel (shown beside it in the UI)
        linked = {x.key: x.value for x in (client.get_logged_model(models[m.step]).metrics or [])}
        assert linked["fsdd_digit/knn1_test"] == m.value and "fsdd_speaker/knn3_val" in linked
    assert history[-1].value == pytest.approx(metrics["fsdd_digit/knn1_test"], abs=1e-6)

    assert select.main(["--params", p, "--metrics", "simclr.json", "--out", "sel", "--verify",
                        "--downstream", "downstream"]) == 0
    chosen = json.loads((sslwork / "sel/selection.json").read_text())
    ids = read_run_record(sslwork / "sel/selection.json")  # run ids and registry versions: not in the DVC output
    assert ids["mlflow_run_id"] == run_id and "run_id" not in chosen
    assert chosen["registered_model"] == "enc-simclr" and sorted(chosen["tasks"]) == ["fsdd_digit", "fsdd_speaker"]
    for task, sel in chosen["tasks"].items():
        vals = {m.step: m.value for m in client.get_metric_history(run_id, f"{task}/knn1_val")}
        assert sel["best_round"] in (1, 2) and sel["best_val"] == max(vals[1], vals[2])
        assert "model_id" not in sel and ids["tasks"][task]["model_id"] == models[sel["best_round"]]
        version = client.get_model_version_by_alias("enc-simclr", task)
        assert int(version.version) == ids["tasks"][task]["version"]
        assert version.tags["fedaudio.round"] == str(sel["best_round"])
        # Loading the aliased model from the registry reproduces the score logged for its round.
        assert sel["reproduced_test"] == pytest.approx(sel["best_test"], abs=1e-9)
    assert "| fsdd_digit |" in (sslwork / "sel/selection.md").read_text()
    # Selecting again (the command on a finished run) registers nothing new and gives the same choice.
    assert select.main(["--params", p, "--run-id", run_id, "--out", "sel2"]) == 0
    again = json.loads((sslwork / "sel2/selection.json").read_text())
    def choice(selection: dict[str, Any]) -> dict[str, Any]:  # without --verify's reloaded score
        return {t: {k: v for k, v in s.items() if k != "reproduced_test"} for t, s in selection["tasks"].items()}

    assert choice(again) == choice(chosen)  # the same choice
    versions = {t: s["version"] for t, s in ids["tasks"].items()}
    assert {t: s["version"] for t, s in read_run_record(sslwork / "sel2/selection.json")["tasks"].items()} == versions


def test_backbone_only_acop_keeps_heads_on_clients_and_resumes_bit_for_bit(
        sslwork: Path, small_mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.tracking import FederateTracker

    monkeypatch.chdir(sslwork)
    p = str(_write(sslwork / "acop.yaml", _ssl_params(small_mirror, "acop", rounds=3, send="backbone")))
    assert federate.main(_args(p, "acop-ref")) == 0

    log_round = _kill_at_round(monkeypatch, 3)
    with pytest.raises(_Killed):
        federate.main(_args(p, "acop"))
    store = ClientStore(sslwork / "ckpt-acop" / "clients")
    kept, _ = store.load(0, 2)  # type: ignore[misc]
    assert any(k.startswith("projector.") for k in kept)  # the order classifier never leaves the client
    monkeypatch.setattr(FederateTracker, "log_round", log_round)
    assert federate.main(_args(p, "acop")) == 0

    reference, resumed = (json.loads((sslwork / f"{n}.json").read_text()) for n in ("acop-ref", "acop"))
    scores = [k for k in reference if "/" in k]
    assert scores and {k: resumed[k] for k in scores} == {k: reference[k] for k in scores}
    assert resumed["floor"] == reference["floor"]
    assert (sslwork / "acop.json").read_bytes() == (sslwork / "acop-ref.json").read_bytes()
    # Run again once finished (as `dvc repro` does after a code change: the checkpoints persist): every row, the
    # last and the floor included, is read back from the checkpoint (sorted keys), and the same bytes are written.
    assert federate.main(_args(p, "acop")) == 0
    assert (sslwork / "acop.json").read_bytes() == (sslwork / "acop-ref.json").read_bytes()
    final, expected = load_state(sslwork / "acop.st"), load_state(sslwork / "acop-ref.st")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    rows = (sslwork / "plots-acop-ref/rounds.tsv").read_text().splitlines()
    assert len(rows) == 4  # header + 3 rounds


def test_ssl_with_a_personal_rule_is_refused_before_any_work(sslwork: Path, small_mirror: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(sslwork)
    p = str(_write(sslwork / "bad.yaml", _ssl_params(small_mirror, "simclr", local_algorithm="fml")))
    assert federate.main(_args(p, "bad")) == 2
    assert "ssl: 'method' 'simclr' needs a local algorithm" in capsys.readouterr().err
    assert not (sslwork / "ckpt-bad").exists()
