"""Audio-visual stages end to end on real spoken digits: pairing, modality-wise rounds, MLflow registration, the
distill stage reading its teacher and student from the registry, and resume after a kill."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fedcore.federation.checkpoint import load_state
from fedcore.multimodal.data import video_clients
from flows import av as av_flow
from flows import distill as distill_flow
from flows import download, features, partition
from flows import modality as modality_flow
from tasks.rounds import read_run_record
from tasks.tracking import load_logged_model
from tests.flows.conftest import tiny_params
from tests.flows.test_stages import _kill_at_round, _Killed

pytestmark = pytest.mark.integration


def _params(mirror: Path, method: str, **modality: object) -> dict[str, object]:
    params = tiny_params(mirror, model={"width": 4, "depth": 2},
                         federation={"batch_size": 16, "local_epochs": 1, "rounds": 3, "lr": 0.05})
    params["modality"] = {"method": method, "missing_rate": 0.34, "fusion_rounds": 1, "embed_dim": 8,
                          "hidden_dim": 8, "visual_width": 4, "registered_model": f"av-{method}",
                          "registered_audio": f"av-{method}-audio", **modality}
    params["distill"] = {"teacher": f"models:/av-{method}@final", "student": f"models:/av-{method}-audio@final",
                         "rounds": 2, "registered_model": f"student-{method}"}
    return params


def _write(path: Path, params: dict[str, object]) -> str:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def avwork(tmp_path_factory: pytest.TempPathFactory, small_mirror: Path, prefect_api: str) -> Path:
    """Small real FSDD: features, the visual store (paired digit images) and a 3-client partition."""
    root = tmp_path_factory.mktemp("av")
    p = _write(root / "params.yaml", _params(small_mirror, "modality_mirror"))
    assert download.main(["--params", p, "--out", str(root / "raw"), "--downloads", str(root / "dl")]) == 0
    assert features.main(["--params", p, "--raw", str(root / "raw"), "--out", str(root / "features")]) == 0
    assert partition.main(["--params", p, "--features", str(root / "features"), "--out", str(root / "part")]) == 0
    assert av_flow.main(["--params", p, "--features", str(root / "features"), "--visual", str(root / "av")]) == 0
    return root


def _train_args(p: str, name: str) -> list[str]:
    return ["--params", p, "--features", "features", "--partition", "part/partition.json", "--visual",
            "av", "--checkpoints", f"ck-{name}", "--model", f"{name}.st", "--metrics", f"{name}.json", "--plots",
            f"plots-{name}"]


def test_every_clip_is_paired_with_an_image_of_its_own_digit(avwork: Path) -> None:
    from fedcore.multimodal.data import digit_images, keep_pca_energy, split_images

    images, labels = digit_images()
    train_pool, _ = split_images(labels, 0.3, 0)  # modality's defaults: image_test_fraction, pair_seed
    reduced = keep_pca_energy(images, train_pool, 0.25)  # visual_energy's default (AV-MNIST)
    visual = np.load(avwork / "av" / "visual.npy")
    with (avwork / "av" / "pairs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert visual.shape == (len(rows), 1, 8, 8) and visual.dtype == np.float32
    for i, row in enumerate(rows):
        source = int(row["visual"].split(":")[1])
        assert labels[source] == row["label"]
        assert np.array_equal(visual[i], reduced.images[source])  # the PCA-reduced image, not the original
    meta = json.loads((avwork / "av" / "meta.json").read_text())
    assert meta["pca"] == {"visual_energy": 0.25, "pca_components": reduced.components, "pca_dims": 64,
                           "pca_energy_kept": reduced.energy}
    assert 1 <= reduced.components < 64 and reduced.energy >= 0.25
    train_images = {r["visual"] for r in rows if r["split"] == "train"}
    test_images = {r["visual"] for r in rows if r["split"] == "test"}
    assert not train_images & test_images  # test clips are paired with held-out images
    assert (avwork / "av" / "pairs.png").stat().st_size > 0


def test_modality_mirror_then_distill_through_the_registry(avwork: Path, small_mirror: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.chdir(avwork)
    p = _write(avwork / "mm.yaml", _params(small_mirror, "modality_mirror"))
    assert modality_flow.main(["train", *_train_args(p, "mm")]) == 0
    metrics = json.loads(Path("mm.json").read_text())
    video = video_clients(3, 0.34, 0)
    assert len(video) == 2 and metrics["video_clients"] == video  # exactly round(0.34 * 3) = 1 client without
    rows = Path("plots-mm/rounds.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    assert len(rows) == 4
    visual_clients = [float(r.split("\t")[header.index("num_visual_clients")]) for r in rows[1:]]
    audio_clients = [float(r.split("\t")[header.index("num_audio_clients")]) for r in rows[1:]]
    assert visual_clients == [2.0] * 3 and audio_clients == [3.0] * 3

    teacher, inputs = load_logged_model("models:/av-modality_mirror@final")
    assert inputs == ("audio", "visual")
    final = load_state(Path("mm.st"))
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in final.items())
    student, student_inputs = load_logged_model("models:/av-modality_mirror-audio@final")
    assert student_inputs == ("audio",)
    assert set(student.state_dict()) == {k for k in final if k.split(".")[0] in ("audio", "audio_head")}
    assert all(torch.equal(v, final[k]) for k, v in student.state_dict().items())  # the student starts from phase 1

    assert distill_flow.main(["--params", p, "--features", "features", "--partition", "part/partition.json",
                              "--visual", "av", "--checkpoints", "ck-d", "--model", "d.st", "--metrics", "d.json",
                              "--plots", "plots-d"]) == 0
    distilled = json.loads(Path("d.json").read_text())
    assert distilled["clients"] == video  # the teacher reads video: only the clients holding it
    assert 0.0 <= distilled["val_audio_accuracy"] <= 1.0 and 0.0 <= metrics["val_audio_accuracy"] <= 1.0
    assert distilled["audio_accuracy_before"] == pytest.approx(metrics["audio_branch_accuracy"], abs=1e-6)
    # the registered student, loaded as a user would, reproduces the logged score
    reloaded, _ = load_logged_model("models:/student-modality_mirror@final")
    from fedcore.multimodal.evaluate import evaluate_student
    from tasks.common import read_params
    from tasks.modality import load_av_data

    data = load_av_data(Path("features"), Path("part/partition.json"), Path("av"), read_params(p).modality)
    assert evaluate_student(reloaded, data.test, 64)["audio_accuracy"] == pytest.approx(
        distilled["audio_accuracy"], abs=1e-9)
    run = mlflow.get_run(read_run_record(Path("d.json"))["mlflow_run_id"])
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "audio_accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]


@pytest.mark.parametrize("method", ["unifl", "multifl", "harmony"])
def test_baselines_run_and_report_what_they_serve(avwork: Path, small_mirror: Path, method: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(avwork)
    p = _write(avwork / f"{method}.yaml", _params(small_mirror, method))
    assert modality_flow.main(_train_args(p, method)) == 0
    metrics = json.loads(Path(f"{method}.json").read_text())
    served = {"unifl": "audio_branch_accuracy", "multifl": "zero_video_accuracy",
              "harmony": "audio_branch_accuracy"}[method]
    assert metrics["audio_accuracy"] == metrics[served]
    assert ("av_accuracy" in metrics) == (method != "unifl")
    rows = Path(f"plots-{method}/rounds.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    visual = [float(r.split("\t")[header.index("num_visual_clients")]) for r in rows[1:]]
    clients = [float(r.split("\t")[header.index("num_clients")]) for r in rows[1:]]
    expected = {"unifl": ([0.0] * 3, [3.0] * 3), "multifl": ([3.0] * 3, [3.0] * 3),  # zero-filled video
                "harmony": ([2.0, 2.0, 0.0], [3.0, 3.0, 2.0])}[method]  # fusion round: video clients only
    assert (visual, clients) == expected


def test_a_killed_modality_run_resumes_to_the_same_result(avwork: Path, small_mirror: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(avwork)
    p = _write(avwork / "kill.yaml", _params(small_mirror, "harmony", registered_model="av-kill",
                                             registered_audio="av-kill-audio"))
    assert modality_flow.main(_train_args(p, "whole")) == 0
    log_round = _kill_at_round(monkeypatch, 3)
    with pytest.raises(_Killed):
        modality_flow.main(_train_args(p, "cut"))
    monkeypatch.setattr("tasks.tracking.FederateTracker.log_round", log_round)
    assert modality_flow.main(_train_args(p, "cut")) == 0
    whole, cut = json.loads(Path("whole.json").read_text()), json.loads(Path("cut.json").read_text())
    for key in ("audio_accuracy", "audio_branch_accuracy", "av_accuracy", "zero_video_accuracy"):
        assert cut[key] == whole[key]
    a, b = load_state(Path("whole.st")), load_state(Path("cut.st"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_phase_that_needs_video_fails_early_when_no_client_has_it(avwork: Path, small_mirror: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(avwork)
    p = _write(avwork / "novideo.yaml", _params(small_mirror, "harmony", missing_rate=1.0))
    assert modality_flow.main(_train_args(p, "novideo")) == 1
    assert "none has video" in capsys.readouterr().err
