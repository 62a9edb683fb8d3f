"""Stage entry points in-process under the Prefect harness: outputs on success, clear errors on bad input."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml

from fedcore.federation.checkpoint import Checkpointer, load_state
from fedcore.federation.client_store import ClientStore
from flows import check, download, features, federate, partition, poison
from tasks.common import read_params
from tasks.rounds import read_run_record
from tasks.tracking import tracking_uri
from tests.flows.conftest import stage_env, tiny_params

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, small_mirror: Path, prefect_api: str) -> Path:
    """download → features → partition run once on the small real FSDD archive."""
    root = tmp_path_factory.mktemp("stages")
    write_params(root / "params.yaml", tiny_params(small_mirror))
    p = str(root / "params.yaml")
    assert download.main(["--params", p, "--out", str(root / "raw"), "--downloads", str(root / "dl")]) == 0
    assert features.main(["--params", p, "--raw", str(root / "raw"), "--out", str(root / "features")]) == 0
    assert partition.main(["--params", p, "--features", str(root / "features"), "--out", str(root / "part")]) == 0
    return root


def write_params(path: Path, params: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_data_stages_write_their_outputs(workdir: Path) -> None:
    index = (workdir / "features/index.csv").read_text().splitlines()
    assert len(index) == 181
    meta = json.loads((workdir / "features/meta.json").read_text())
    assert meta["labels"] == [str(d) for d in range(10)]
    assert np.load(workdir / "features/features.npy", mmap_mode="r").shape == (180, 64, 101)
    part = json.loads((workdir / "part/partition.json").read_text())
    assert part["num_clients"] == 3 and len(part["test"]) == 60
    assert (workdir / "part/heatmap.png").stat().st_size > 1000


def test_poison_and_federate_with_snr_noise(workdir: Path, small_mirror: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(workdir)
    params = tiny_params(small_mirror, poison={"attack": "snr_noise", "client_fraction": 0.34, "snr_db": 0.0})
    p = str(write_params(workdir / "snr.yaml", params))
    assert poison.main(["--params", p, "--raw", "raw", "--features", "features", "--partition",
                        "part/partition.json", "--out", "poison"]) == 0
    truth = json.loads((workdir / "poison/ground_truth.json").read_text())
    assert len(truth["attacked_clients"]) == 1
    with np.load(workdir / "poison/overlay.npz") as overlay:
        assert overlay["features"].shape[0] == truth["num_attacked_samples"] > 0
    args = ["--params", p, "--features", "features", "--partition", "part/partition.json", "--poison", "poison",
            "--checkpoints", "ckpt", "--model", "model.safetensors", "--metrics", "metrics.json", "--plots", "plots"]
    assert federate.main(args) == 0
    first = json.loads((workdir / "metrics.json").read_text())
    first_record = read_run_record(workdir / "metrics.json")
    assert first["rounds"] == 2
    # Same params and seed, fresh checkpoints: the same metrics, bit for bit.
    shutil.rmtree(workdir / "ckpt")
    assert federate.main(args) == 0
    second = json.loads((workdir / "metrics.json").read_text())
    keys = ["global_accuracy", "global_loss", "personalised_accuracy_mean", "personalised_accuracy_worst10"]
    assert {k: first[k] for k in keys} == {k: second[k] for k in keys}
    # the run-specific values live in the run record, not in the DVC output
    assert "mlflow_run_id" not in first and "seconds_total" not in first
    assert read_run_record(workdir / "metrics.json")["mlflow_run_id"] != first_record["mlflow_run_id"]


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("partition", {"colour": "red"}, "partition: unknown keys ['colour']"),
        ("partition", {"alpha": 0}, "partition: 'alpha' must be > 0.0. Got 0."),
        ("partition", {"alpha": -0.5}, "partition: 'alpha' must be > 0.0. Got -0.5."),
        ("download", {"colour": "red"}, "download: unknown keys ['colour']"),
    ],
)
def test_bad_params_fail_before_any_work(workdir: Path, small_mirror: Path, section: str,
                                         values: dict[str, object], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # A stage checks the sections it reads before it does anything (the pipeline's check stage checks them all).
    params = tiny_params(small_mirror)
    params[section].update(values)
    p = str(write_params(workdir / "bad.yaml", params))
    out = workdir / "never"
    if section == "download":
        code = download.main(["--params", p, "--out", str(out), "--downloads", str(workdir / "dl")])
    else:
        code = partition.main(["--params", p, "--features", str(workdir / "features"), "--out", str(out)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_stage_leaves_the_sections_it_does_not_read_to_the_check_stage(workdir: Path, small_mirror: Path) -> None:
    params = tiny_params(small_mirror)
    params["partition"].update(alpha=0)
    p = str(write_params(workdir / "bad.yaml", params))
    assert download.main(["--params", p, "--out", str(workdir / "raw3"), "--downloads", str(workdir / "dl")]) == 0
    assert check.main(["--params", p, "--out", str(workdir / "checked.json")]) == 2


def test_more_clients_than_samples_is_a_clear_error(workdir: Path, small_mirror: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    params = tiny_params(small_mirror, partition={"num_clients": 500, "min_samples": 1})
    p = str(write_params(workdir / "many.yaml", params))
    before = (workdir / "part/partition.json").read_bytes()
    assert partition.main(["--params", p, "--features", str(workdir / "features"),
                           "--out", str(workdir / "part")]) == 1
    assert "'num_clients' must be <= the number of training samples (120). Got 500." in capsys.readouterr().err
    assert (workdir / "part/partition.json").read_bytes() == before  # finished work kept


def test_wrong_checksum_is_a_clear_error_and_keeps_the_file(workdir: Path, small_mirror: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    params = tiny_params(small_mirror, download={"sha256": "0" * 64})
    p = str(write_params(workdir / "sum.yaml", params))
    assert download.main(["--params", p, "--out", str(workdir / "raw2"), "--downloads", str(workdir / "dl2")]) == 1
    err = capsys.readouterr().err
    assert "0" * 64 in err and "sha256" in err
    assert not (workdir / "raw2" / "manifest.csv").exists()


@pytest.mark.parametrize("runner", ["dask", "ray"])
def test_cluster_runners_give_the_same_metrics_as_threads(workdir: Path, small_mirror: Path, runner: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip({"dask": "prefect_dask", "ray": "prefect_ray"}[runner])
    monkeypatch.chdir(workdir)
    results = {}
    for name in ("threads", runner):
        params = tiny_params(small_mirror, execution={"runner": name, "max_workers": 2})
        p = str(write_params(workdir / f"{name}.yaml", params))
        assert poison.main(["--params", p, "--raw", "raw", "--features", "features", "--partition",
                            "part/partition.json", "--out", "poison-none"]) == 0
        assert federate.main(["--params", p, "--features", "features", "--partition", "part/partition.json",
                              "--poison", "poison-none", "--checkpoints", f"ckpt-{name}", "--model", f"{name}.st",
                              "--metrics", f"{name}.json", "--plots", f"plots-{name}"]) == 0
        results[name] = json.loads((workdir / f"{name}.json").read_text())
    keys = ["global_accuracy", "global_loss", "personalised_accuracy_mean", "personalised_accuracy_worst10"]
    assert {k: results[runner][k] for k in keys} == {k: results["threads"][k] for k in keys}


@pytest.fixture()
def ray_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local Ray cluster (head node, 2 CPUs) started with ``ray start``, as a user would; stopped afterwards."""
    pytest.importorskip("prefect_ray")
    ray = Path(sys.executable).with_name("ray")
    port = _free_port()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a local test cluster: no token to hand the workers
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    head = subprocess.Popen([str(ray), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {head.stderr.read().decode() if head.stderr else ''}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):  # --block: the head takes its processes down with it
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_running_ray_cluster_gives_the_same_metrics_as_threads(workdir: Path, small_mirror: Path,
                                                                  ray_cluster: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    results = {}
    for name, execution in (("threads", {"runner": "threads", "max_workers": 2}),
                            ("cluster", {"runner": "ray", "max_workers": 2, "address": ray_cluster})):
        params = tiny_params(small_mirror, execution=execution)
        p = str(write_params(workdir / f"{name}-addr.yaml", params))
        assert poison.main(["--params", p, "--raw", "raw", "--features", "features", "--partition",
                            "part/partition.json", "--out", "poison-none"]) == 0
        assert federate.main(_federate_args(p, f"{name}-addr")) == 0
        results[name] = json.loads((workdir / f"{name}-addr.json").read_text())
    keys = ["global_accuracy", "global_loss", "personalised_accuracy_mean", "personalised_accuracy_worst10"]
    assert {k: results["cluster"][k] for k in keys} == {k: results["threads"][k] for k in keys}
    final = {name: load_state(workdir / f"{name}-addr.st") for name in results}
    assert all(torch.equal(final["cluster"][k], final["threads"][k]) for k in final["threads"])


def test_threads_runner_rejects_a_cluster_address(workdir: Path, small_mirror: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    params = tiny_params(small_mirror, execution={"address": "127.0.0.1:6379"})
    p = str(write_params(workdir / "addr.yaml", params))
    assert federate.main(_federate_args(p, "addr")) == 2
    assert "'address' must be null with runner 'threads'" in capsys.readouterr().err


def test_bad_audio_is_skipped_counted_and_reported(tmp_path: Path, small_mirror: Path, prefect_api: str) -> None:
    import soundfile as sf

    from tests.conftest import sine

    folder = tmp_path / "mine"
    folder.mkdir()
    lines = ["path,label,speaker,split"]
    for i in range(6):
        sf.write(folder / f"good{i}.wav", sine(8000, 0.3, 200.0 + 50 * i), 8000, subtype="PCM_16")
        lines.append(f"good{i}.wav,{'ab'[i % 2]},s{i % 3},{'test' if i == 0 else 'train'}")
    sf.write(folder / "truncated.wav", sine(8000, 0.5), 8000, subtype="PCM_16")
    data = (folder / "truncated.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(data[: len(data) // 2])
    (folder / "empty.wav").write_bytes(b"")
    (folder / "notes.wav").write_text("this is not audio\n")
    lines += ["truncated.wav,a,s0,train", "empty.wav,b,s1,train", "notes.wav,a,s2,train"]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    params = tiny_params(small_mirror, download={"dataset": "manifest", "manifest": str(folder / "manifest.csv")})
    p = str(write_params(tmp_path / "params.yaml", params))
    assert download.main(["--params", p, "--out", str(tmp_path / "raw"), "--downloads", str(tmp_path / "dl")]) == 0
    report = json.loads((tmp_path / "raw/report.json").read_text())
    assert report["num_ok"] == 6 and report["num_skipped"] == 3
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert reasons["truncated.wav"].startswith("truncated")
    assert reasons["empty.wav"].startswith("empty")
    assert reasons["notes.wav"].startswith("not an audio file")
    assert len((tmp_path / "raw/manifest.csv").read_text().splitlines()) == 7


def _federate_args(p: str, name: str) -> list[str]:
    return ["--params", p, "--features", "features", "--partition", "part/partition.json", "--poison", "poison-none",
            "--checkpoints", f"ckpt-{name}", "--model", f"{name}.st", "--metrics", f"{name}.json",
            "--plots", f"plots-{name}"]


def test_update_attack_is_detected_and_logged(workdir: Path, small_mirror: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.chdir(workdir)
    params = tiny_params(small_mirror, federation={"aggregator": "lpa"},
                         aggregation={"rules": {"lpa": {"lpa_rule": "fraction", "lpa_fraction": 0.34}}},
                         attack={"name": "sign_flip", "client_fraction": 0.34})
    p = str(write_params(workdir / "attack.yaml", params))
    assert poison.main(["--params", p, "--raw", "raw", "--features", "features", "--partition",
                        "part/partition.json", "--out", "poison-none"]) == 0
    assert federate.main(_federate_args(p, "attack")) == 0
    metrics = json.loads((workdir / "attack.json").read_text())
    assert len(metrics["malicious_clients"]) == 1
    assert 0.0 <= metrics["detect_precision"] <= 1.0 and 0.0 <= metrics["detect_recall"] <= 1.0
    detection = json.loads((workdir / "plots-attack/detection.json").read_text())
    assert detection["malicious_clients"] == metrics["malicious_clients"]
    assert [r["round"] for r in detection["rounds"]] == [1, 2]
    # The fraction rule prunes one client per layer; every layer's exclusions are reported.
    assert all(len(v) == 1 for r in detection["rounds"] for v in r["excluded_per_layer"].values())
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(read_params(p).mlflow, workdir))
    run_id = read_run_record(workdir / "attack.json")["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "num_flagged")] == [1, 2]
    run = client.get_run(run_id)
    assert run.data.params["attack.malicious_clients"] == str(metrics["malicious_clients"])


def test_nan_updates_are_rejected_and_the_run_finishes(workdir: Path, small_mirror: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    params = tiny_params(small_mirror, attack={"name": "nan", "client_fraction": 0.34})
    p = str(write_params(workdir / "nan.yaml", params))
    assert poison.main(["--params", p, "--raw", "raw", "--features", "features", "--partition",
                        "part/partition.json", "--out", "poison-none"]) == 0
    assert federate.main(_federate_args(p, "nan")) == 0
    metrics = json.loads((workdir / "nan.json").read_text())
    assert metrics["rejected_updates"] == 2  # the one attacker, in each of 2 rounds
    assert metrics["detect_precision"] == 1.0 and metrics["detect_recall"] == 1.0
    assert np.isfinite(metrics["global_loss"])
    rounds = json.loads((workdir / "plots-nan/detection.json").read_text())["rounds"]
    assert all("must hold finite values" in reason for r in rounds for reason in r["rejected"].values())


def test_backbone_only_sends_fewer_bytes_and_keeps_heads_local(workdir: Path, small_mirror: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    sent = {}
    for send in ("all", "backbone"):
        params = tiny_params(small_mirror, federation={"send": send, "local_algorithm": "fedu"})
        p = str(write_params(workdir / f"send-{send}.yaml", params))
        assert poison.main(["--params", p, "--raw", "raw", "--features", "features", "--partition",
                            "part/partition.json", "--out", "poison-none"]) == 0
        assert federate.main(_federate_args(p, f"send-{send}")) == 0
        rows = (workdir / f"plots-send-{send}/rounds.tsv").read_text().splitlines()
        header = rows[0].split("\t")
        sent[send] = float(rows[1].split("\t")[header.index("bytes_up")])
    # The head (the classifier's weight and bias, float32) stays on each of the 3 clients.
    head = sum(t.numel() * 4 for k, t in load_state(workdir / "send-all.st").items() if k.startswith("classifier."))
    assert head > 0 and sent["all"] - sent["backbone"] == 3 * head


class _Killed(Exception):
    """Stands for a kill between two rounds (after round 2's checkpoint, before round 3's)."""


def _kill_at_round(monkeypatch: pytest.MonkeyPatch, server_round: int) -> Callable[..., None]:
    """Make the federate flow die when it logs ``server_round`` (its clients trained, its checkpoint not yet
    written); return the original ``FederateTracker.log_round`` to put back."""
    from tasks.tracking import FederateTracker

    log_round = FederateTracker.log_round

    def killed(self: FederateTracker, round_: int, *args: object, **kwargs: object) -> None:
        if round_ == server_round:
            raise _Killed
        log_round(self, round_, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(FederateTracker, "log_round", killed)
    return log_round


def test_resume_restores_server_moments_and_client_kept_heads(workdir: Path, small_mirror: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """FedAdam's moments and the heads that clients keep (send=backbone, FedU) survive a kill bit for bit."""
    from tasks.tracking import FederateTracker

    monkeypatch.chdir(workdir)
    params = tiny_params(small_mirror, federation={"rounds": 3, "aggregator": "fedadam", "send": "backbone",
                                                   "local_algorithm": "fedu"},
                         aggregation={"rules": {"fedadam": {"server_lr": 0.1}}})
    p = str(write_params(workdir / "resume.yaml", params))
    assert poison.main(["--params", p, "--raw", "raw", "--features", "features", "--partition",
                        "part/partition.json", "--out", "poison-none"]) == 0
    assert federate.main(_federate_args(p, "resume-ref")) == 0

    log_round = _kill_at_round(monkeypatch, 3)
    with pytest.raises(_Killed):
        federate.main(_federate_args(p, "resume"))
    latest = json.loads((workdir / "ckpt-resume/latest.json").read_text())
    assert latest["round"] == 2
    saved = safetensors.torch.load_file(workdir / "ckpt-resume" / latest["file"])
    assert any("aggregator/m/" in k for k in saved) and any("aggregator/v/" in k for k in saved)
    # The heads that are never sent live in the client store, at both kept checkpoints' rounds (a damaged round 2
    # falls back to round 1 with its client states); round 3's were written before the kill and are rolled back.
    store = ClientStore(workdir / "ckpt-resume" / "clients")
    assert store.rounds(0) == [1, 2, 3]
    kept, _ = store.load(0, 2)  # type: ignore[misc]
    assert any(k.startswith("classifier.") for k in kept)
    monkeypatch.setattr(FederateTracker, "log_round", log_round)
    assert federate.main(_federate_args(p, "resume")) == 0

    reference, resumed = (json.loads((workdir / f"{name}.json").read_text()) for name in ("resume-ref", "resume"))
    keys = ("global_accuracy", "global_loss", "personalised_accuracy_mean", "personalised_accuracy_worst10")
    assert {k: resumed[k] for k in keys} == {k: reference[k] for k in keys}
    final, expected = load_state(workdir / "resume.st"), load_state(workdir / "resume-ref.st")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


HETEROGENEOUS = [{"name": "cnn", "width": 4, "depth": 2}, {"name": "cnn", "width": 8, "depth": 3},
                 {"name": "resnet", "width": 2, "depth": 1}]


@pytest.mark.parametrize("algorithm", ["fedmlac", "fml", "local"])
def test_personal_models_survive_a_kill_bit_for_bit(algorithm: str, workdir: Path, small_mirror: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Personal models (three architectures) and their optimiser state round-trip through the client store."""
    from tasks.tracking import FederateTracker

    monkeypatch.chdir(workdir)
    params = tiny_params(small_mirror, federation={"rounds": 3, "local_algorithm": algorithm},
                         model={"width": 4, "depth": 2}, personal={"models": HETEROGENEOUS})
    p = str(write_params(workdir / f"{algorithm}.yaml", params))
    assert poison.main(["--params", p, "--raw", "raw", "--features", "features", "--partition",
                        "part/partition.json", "--out", "poison-none"]) == 0
    assert federate.main(_federate_args(p, f"{algorithm}-ref")) == 0

    log_round = _kill_at_round(monkeypatch, 3)
    with pytest.raises(_Killed):
        federate.main(_federate_args(p, algorithm))
    store = ClientStore(workdir / f"ckpt-{algorithm}" / "clients")
    assert store.clients() == [0, 1, 2] and all(store.rounds(c) == [1, 2, 3] for c in range(3))
    shapes = set()
    for client in range(3):
        kept, meta = store.load(client, 2)  # type: ignore[misc]
        assert meta["round"] == "2"
        shapes.add(tuple(kept["personal/classifier.weight"].shape))
        # FML/FedMLAC keep the personal model's momentum; local-only training makes its optimiser anew
        assert any(k.startswith("optim/") for k in kept) == (algorithm != "local")
    assert len(shapes) == 3  # three architectures: classifiers on 8, 32 and 16 channels
    monkeypatch.setattr(FederateTracker, "log_round", log_round)
    assert federate.main(_federate_args(p, algorithm)) == 0
    assert all(store.rounds(c) == [2, 3] for c in range(3))  # the states of the two kept checkpoints

    reference, resumed = (json.loads((workdir / f"{name}.json").read_text()) for name in (f"{algorithm}-ref",
                                                                                         algorithm))
    keys = ("global_accuracy", "global_loss", "personalised_accuracy_mean", "personalised_accuracy_worst10")
    assert {k: resumed[k] for k in keys} == {k: reference[k] for k in keys}
    final, expected = load_state(workdir / f"{algorithm}.st"), load_state(workdir / f"{algorithm}-ref.st")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    ref_store = ClientStore(workdir / f"ckpt-{algorithm}-ref" / "clients")
    for client in range(3):
        (got, _), (want, _) = store.load(client, 3), ref_store.load(client, 3)  # type: ignore[misc]
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_max_workers_does_not_change_any_output(workdir: Path, small_mirror: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Each client trains on ``client_threads`` threads whatever runs beside it: one or two parallel clients give
    byte-identical outputs (per-round table, metrics, model)."""
    monkeypatch.chdir(workdir)
    outputs = {}
    for workers in (1, 2):
        params = tiny_params(small_mirror, execution={"max_workers": workers})
        p = str(write_params(workdir / f"workers{workers}.yaml", params))
        assert poison.main(["--params", p, "--raw", "raw", "--features", "features", "--partition",
                            "part/partition.json", "--out", "poison-none"]) == 0
        assert federate.main(_federate_args(p, f"workers{workers}")) == 0
        outputs[workers] = [(workdir / path).read_bytes() for path in
                            (f"plots-workers{workers}/rounds.tsv", f"workers{workers}.json", f"workers{workers}.st")]
    assert outputs[1] == outputs[2]


def _raising_for(monkeypatch: pytest.MonkeyPatch, clients: set[int], from_round: int = 1) -> None:
    """Make the local training of ``clients`` raise from ``from_round`` on (inside the client task)."""
    import fedcore.plans.supervised

    original = fedcore.plans.supervised.client_generator

    def generator(seed: int, server_round: int, client_id: int) -> object:
        if client_id in clients and server_round >= from_round:
            raise RuntimeError(f"disk of client {client_id} on fire")
        return original(seed, server_round, client_id)

    monkeypatch.setattr(fedcore.plans.supervised, "client_generator", generator)


def test_a_client_that_keeps_raising_is_rejected_and_the_run_goes_on(workdir: Path, small_mirror: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.chdir(workdir)
    p = str(write_params(workdir / "raising.yaml", tiny_params(small_mirror)))
    assert poison.main(["--params", p, "--raw", "raw", "--features", "features", "--partition",
                        "part/partition.json", "--out", "poison-none"]) == 0
    _raising_for(monkeypatch, {1})
    assert federate.main(_federate_args(p, "raising")) == 0
    metrics = json.loads((workdir / "raising.json").read_text())
    assert metrics["rounds"] == 2 and metrics["rejected_updates"] == 2 and np.isfinite(metrics["global_loss"])
    rounds = json.loads((workdir / "plots-raising/detection.json").read_text())["rounds"]
    assert [r["failed"] for r in rounds] == [[1], [1]]
    assert all("RuntimeError: disk of client 1 on fire" in r["rejected"]["1"] for r in rounds)
    table = (workdir / "plots-raising/rounds.tsv").read_text().splitlines()
    column = table[0].split("\t").index("num_failed")
    assert [line.split("\t")[column] for line in table[1:]] == ["1", "1"]
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(read_params(p).mlflow, workdir))
    run_id = read_run_record(workdir / "raising.json")["mlflow_run_id"]
    assert [m.value for m in client.get_metric_history(run_id, "num_failed")] == [1.0, 1.0]
    logged = sorted(a.path for a in client.list_artifacts(run_id, "rejections"))
    assert logged == ["rejections/round_0001.json", "rejections/round_0002.json"]
    record = json.loads(Path(client.download_artifacts(run_id, logged[0], str(workdir))).read_text())
    assert record["failed"] == [1] and "disk of client 1 on fire" in record["rejected"]["1"]


def test_below_the_quorum_the_round_is_not_applied_and_the_run_stops(workdir: Path, small_mirror: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow

    monkeypatch.chdir(workdir)
    params = tiny_params(small_mirror, federation={"rounds": 3, "min_accepted": 2})
    p = str(write_params(workdir / "quorum.yaml", params))
    assert poison.main(["--params", p, "--raw", "raw", "--features", "features", "--partition",
                        "part/partition.json", "--out", "poison-none"]) == 0
    _raising_for(monkeypatch, {0, 2}, from_round=2)  # 1 of 3 clients left in round 2: below the quorum of 2
    assert federate.main(_federate_args(p, "quorum")) == 1
    err = capsys.readouterr().err
    assert "round 2 needs at least 2 accepted updates (the quorum) of 3. Got 1." in err
    assert "client 0: training raised RuntimeError: disk of client 0 on fire" in err
    assert "checkpoint of round 1" in err and "lower federation.min_accepted" in err
    assert not (workdir / "quorum.json").exists()
    kept = Checkpointer(workdir / "ckpt-quorum", "unused").round_files()
    assert sorted(kept) == [1]  # round 2 was never applied; round 1 stays
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(read_params(p).mlflow, workdir))
    run = client.search_runs([client.get_experiment_by_name("fedaudio").experiment_id],
                             filter_string="tags.`fedaudio.kind` = 'federate'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert run.info.status == "FAILED"
    # the clients recover: a rerun resumes after round 1 and finishes
    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    assert federate.main(_federate_args(p, "quorum")) == 0
    assert "resuming after round 1" in capsys.readouterr().err
    assert json.loads((workdir / "quorum.json").read_text())["rounds"] == 3


@pytest.mark.parametrize("damage", ["truncated_checkpoint", "bit_flipped_client_state"])
def test_a_damaged_checkpoint_or_client_state_falls_back_a_round_and_ends_the_same(
        damage: str, workdir: Path, small_mirror: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Killed after round 2, round 2's file damaged: the resume says so, redoes round 2 from round 1's checkpoint
    and client states, and ends with the uninterrupted run's metrics and model, bit for bit."""
    from tasks.tracking import FederateTracker

    monkeypatch.chdir(workdir)
    params = tiny_params(small_mirror, federation={"rounds": 3, "send": "backbone", "local_algorithm": "fedu"})
    p = str(write_params(workdir / "damage.yaml", params))
    assert poison.main(["--params", p, "--raw", "raw", "--features", "features", "--partition",
                        "part/partition.json", "--out", "poison-none"]) == 0
    if not (workdir / "damage-ref.json").exists():
        assert federate.main(_federate_args(p, "damage-ref")) == 0
    name = f"damage-{damage}"
    log_round = _kill_at_round(monkeypatch, 3)
    with pytest.raises(_Killed):
        federate.main(_federate_args(p, name))
    folder = workdir / f"ckpt-{name}"
    target = folder / ("clients/000001/round_0002.safetensors" if "client" in damage else "round_0002.safetensors")
    data = bytearray(target.read_bytes())
    if damage == "truncated_checkpoint":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-7] ^= 0x10  # one bit of the last tensor's bytes: the file still parses
        target.write_bytes(bytes(data))
    monkeypatch.setattr(FederateTracker, "log_round", log_round)
    capsys.readouterr()
    assert federate.main(_federate_args(p, name)) == 0
    err = capsys.readouterr().err
    assert "round_0002.safetensors" in err and "resuming after round 1 of 3" in err
    reference, resumed = (json.loads((workdir / f"{n}.json").read_text()) for n in ("damage-ref", name))
    assert resumed == reference
    assert (workdir / f"{name}.st").read_bytes() == (workdir / "damage-ref.st").read_bytes()


MIDRANGE_RULE = '''"""Coordinate-wise midrange: (min + max) / 2 of the clients' values, in one file."""

from fedcore.aggregation import AGGREGATORS
from fedcore.aggregation.base import Aggregator, Combination, floating_keys, stacked


@AGGREGATORS.register("midrange")
class Midrange(Aggregator):
    def combine(self, global_state, updates, server_round):
        state = {}
        for key in floating_keys(global_state):
            matrix = stacked(updates, key)
            state[key] = ((matrix.min(dim=0).values + matrix.max(dim=0).values) / 2).reshape(global_state[key].shape)
        return Combination(state=state, weights={u.client_id: 1.0 / len(updates) for u in updates})
'''


def test_a_one_file_aggregator_runs_the_fedavg_study(workdir: Path, small_mirror: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The docs' example: a rule in a module of the user's (here a temporary one) named in plugins.modules."""
    monkeypatch.chdir(workdir)
    (tmp_path / "my_midrange.py").write_text(MIDRANGE_RULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    params = tiny_params(small_mirror, federation={"aggregator": "midrange"})
    params["plugins"] = {"modules": ["my_midrange"]}
    p = str(write_params(workdir / "midrange.yaml", params))
    assert poison.main(["--params", p, "--raw", "raw", "--features", "features", "--partition",
                        "part/partition.json", "--out", "poison-none"]) == 0
    assert federate.main(_federate_args(p, "midrange")) == 0
    detection = json.loads((workdir / "plots-midrange/detection.json").read_text())
    assert detection["aggregator"] == "midrange"
    assert json.loads((workdir / "midrange.json").read_text())["rounds"] == 2


def test_a_plugin_that_does_not_import_fails_before_any_work(workdir: Path, small_mirror: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(workdir)
    params = tiny_params(small_mirror)
    params["plugins"] = {"modules": ["plugins.not_there"]}
    p = str(write_params(workdir / "missing-plugin.yaml", params))
    assert federate.main(_federate_args(p, "missing-plugin")) == 2
    assert "plugins: module 'plugins.not_there' could not be imported" in capsys.readouterr().err
    assert not (workdir / "missing-plugin.json").exists()


def test_without_prefect_a_stage_writes_the_same_outputs_and_never_imports_prefect(
        workdir: Path, small_mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``FEDAUDIO_PREFECT=off``: the poison and federate stages in a process of their own (no server, no flow run)
    write byte-for-byte the per-round table, metrics and model of the same stages run as Prefect flows, log the same
    MLflow run, and Prefect is never imported."""
    import mlflow

    monkeypatch.chdir(workdir)
    p = str(write_params(workdir / "noprefect.yaml", tiny_params(small_mirror)))
    poison_args = ["--params", p, "--raw", "raw", "--features", "features", "--partition", "part/partition.json"]
    federate_args = {name: _federate_args(p, name) for name in ("prefect", "noprefect")}
    for name, args in federate_args.items():
        args[args.index("--poison") + 1] = f"poison-{name}"
    assert poison.main([*poison_args, "--out", "poison-prefect"]) == 0
    assert federate.main(federate_args["prefect"]) == 0
    script = ("import sys\nfrom flows import federate, poison\n"
              "code = poison.main(sys.argv[1:9] + ['--out', 'poison-noprefect']) or federate.main(sys.argv[9:])\n"
              "assert 'prefect' not in sys.modules, 'prefect was imported'\nraise SystemExit(code)\n")
    env = {**stage_env(), "FEDAUDIO_PREFECT": "off", "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-c", script, *poison_args, *federate_args["noprefect"]],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "federate rounds: 2/2" in done.stdout and "Flow run" not in done.stdout + done.stderr
    for name in ("prefect", "noprefect"):
        assert (workdir / f"poison-{name}" / "overlay.npz").is_file()
    outputs = {name: [(workdir / path).read_bytes() for path in (f"plots-{name}/rounds.tsv", f"{name}.json",
                                                                  f"{name}.st")] for name in ("prefect", "noprefect")}
    assert outputs["noprefect"] == outputs["prefect"]
    client = mlflow.MlflowClient(tracking_uri(read_params(p).mlflow, workdir))
    run_id = read_run_record(workdir / "noprefect.json")["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["global_accuracy"] == json.loads(outputs["noprefect"][1])["global_accuracy"]


def test_without_prefect_a_cluster_runner_is_a_clear_error(workdir: Path, small_mirror: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("FEDAUDIO_PREFECT", "off")
    p = str(write_params(workdir / "noprefect-dask.yaml", tiny_params(small_mirror, execution={"runner": "dask"})))
    assert federate.main(_federate_args(p, "noprefect-dask")) == 2
    assert "runner 'dask' needs Prefect; with FEDAUDIO_PREFECT=off" in capsys.readouterr().err
    monkeypatch.setenv("FEDAUDIO_PREFECT", "maybe")
    assert federate.main(_federate_args(p, "noprefect-dask")) == 2
    assert "FEDAUDIO_PREFECT='maybe'" in capsys.readouterr().err
