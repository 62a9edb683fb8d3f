"""The round loop with the audio-visual plans (modality, distill): kill/resume bit for bit with FedAdam, screening."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedcore.aggregation.base import ClientUpdate
from fedcore.config import Params, load_params
from fedcore.federation.checkpoint import Checkpointer
from fedcore.federation.engine import Callback, Run, SerialExecutor, run_rounds
from fedcore.models.spec import audio_branch_spec, av_model_spec, build
from fedcore.multimodal import AVClientData, AVData
from fedcore.plans import distill as distill_plan
from fedcore.plans import modality as modality_plan
from fedcore.plans.distill import DistillPlan
from fedcore.plans.modality import ModalityPlan
from tests.fedcore.test_engine import Kill, assert_same_run, without_timings

AUDIO, VISUAL, CLASSES = (1, 8, 10), (1, 8, 8), 3


def synthetic_av(num_clients: int = 4, per_client: int = 12, video: tuple[int, ...] = (0, 1, 2)) -> AVData:
    """Class-dependent blobs in both modalities, two classes per client (non-IID); the last client has no video."""
    g = torch.Generator().manual_seed(11)
    audio_centres = torch.randn(CLASSES, *AUDIO, generator=g)
    visual_centres = torch.rand(CLASSES, *VISUAL, generator=g)

    def draw(labels: torch.Tensor, with_video: bool) -> AVClientData:
        audio = audio_centres[labels] + 0.8 * torch.randn(len(labels), *AUDIO, generator=g)
        visual = visual_centres[labels] + 0.3 * torch.rand(len(labels), *VISUAL, generator=g)
        return AVClientData(audio, visual if with_video else None, labels)

    train = [draw(torch.tensor([(c + i % 2) % CLASSES for i in range(per_client)]), c in video)
             for c in range(num_clients)]
    return AVData(train, draw(torch.arange(18) % CLASSES, True), CLASSES, AUDIO, VISUAL, list(video),
                  draw(torch.arange(9) % CLASSES, True))


def small_params(method: str = "unifl", **sections: dict[str, Any]) -> Params:
    raw: dict[str, dict[str, Any]] = {
        "model": {"name": "cnn", "width": 2, "depth": 2},
        "federation": {"rounds": 4, "batch_size": 4, "lr": 0.05, "momentum": 0.5, "client_fraction": 0.75,
                       "seed": 3, "aggregator": "fedadam"},
        "aggregation": {"rules": {"fedadam": {"server_lr": 0.05}}},
        "partition": {"num_clients": 4},
        "modality": {"method": method, "fusion_rounds": 1, "embed_dim": 4, "hidden_dim": 4, "visual_width": 2,
                     "dropout": 0.2},
        "distill": {"rounds": 4, "lambd": 0.5, "temperature": 2.0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return load_params(raw)


def run_modality(params: Params, data: AVData, folder: Path, callbacks: tuple[Callback, ...] = (),
                 forget: bool = False) -> Run:
    """Build every object from params and disk (as a restarted process would) and run the rounds."""
    plan = ModalityPlan(params, data)
    if forget:
        plan.stateful = lambda: {}  # type: ignore[method-assign]  # forget the server's state on resume
    checkpointer = Checkpointer(folder, modality_plan.run_fingerprint(params, "synthetic"))
    return run_rounds(plan, SerialExecutor(), checkpointer, callbacks, client_threads=1, server_threads=1)


def run_distill(params: Params, data: AVData, folder: Path, callbacks: tuple[Callback, ...] = (),
                forget: bool = False) -> Run:
    """The teacher and the student rebuilt from their specs (as the stage loads them from MLflow), then the rounds."""
    spec = av_model_spec(params.model, params.modality, AUDIO, VISUAL, CLASSES)
    teacher = build(spec, torch.Generator().manual_seed(5))
    student = build(audio_branch_spec(spec), torch.Generator().manual_seed(6))
    plan = DistillPlan(params, data, student, ("audio",), teacher, ("audio", "visual"))
    if forget:
        plan.stateful = lambda: {}  # type: ignore[method-assign]
    checkpointer = Checkpointer(folder, distill_plan.run_fingerprint(params, "synthetic"))
    return run_rounds(plan, SerialExecutor(), checkpointer, callbacks, client_threads=1, server_threads=1)


RUNNERS = {"modality": run_modality, "distill": run_distill}
CASES = [pytest.param("modality", "unifl", id="unifl"), pytest.param("modality", "harmony", id="harmony-two-phases"),
         pytest.param("modality", "modality_mirror", id="modality-mirror-phase1"),
         pytest.param("distill", "modality_mirror", id="distill")]


@pytest.mark.parametrize(("stage", "method"), CASES)
def test_a_killed_fedadam_run_resumes_bit_for_bit(tmp_path: Path, stage: str, method: str) -> None:
    run, params, data = RUNNERS[stage], small_params(method), synthetic_av()
    whole = run(params, data, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(params, data, tmp_path / "cut", (Kill(at=3),))
    resumed = run(params, data, tmp_path / "cut")
    assert resumed.resumed and resumed.start_round == 2
    assert_same_run(whole, resumed)
    assert whole.initial == resumed.initial
    assert len(whole.history) == 4


@pytest.mark.parametrize(("stage", "method"), [CASES[1], CASES[3]])
def test_forgetting_the_fedadam_moments_on_resume_would_be_detected(tmp_path: Path, stage: str,
                                                                   method: str) -> None:
    """The check the resume test relies on can fail: without the moments the resumed run differs."""
    run, params, data = RUNNERS[stage], small_params(method), synthetic_av()
    whole = run(params, data, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(params, data, tmp_path / "cut", (Kill(at=3),))
    forgot = run(params, data, tmp_path / "cut", forget=True)
    assert forgot.resumed
    assert any(not torch.equal(whole.state[k], forgot.state[k]) for k in whole.state)
    assert without_timings(forgot.history) != without_timings(whole.history)


@pytest.mark.parametrize(("stage", "job"), [("modality", "train_av_job"), ("distill", "train_student_job")])
def test_a_nan_update_is_rejected_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str,
                                                      job: str) -> None:
    module = modality_plan if stage == "modality" else distill_plan
    original = getattr(module, job)

    def poisoned(spec: Any, client_id: int, server_round: int, *args: Any) -> ClientUpdate:
        update = original(spec, client_id, server_round, *args)
        if client_id == 1 and server_round == 2:
            key = next(k for k, v in update.state.items() if v.is_floating_point())
            update.state[key] = torch.full_like(update.state[key], float("nan"))
        return update

    monkeypatch.setattr(module, job, poisoned)
    params = small_params("modality_mirror", federation={"client_fraction": 1.0, "rounds": 3},
                          distill={"rounds": 3})
    run = RUNNERS[stage](params, synthetic_av(), tmp_path)
    assert [row["num_rejected"] for row in run.history] == [0.0, 1.0, 0.0]
    assert "finite" in run.records[1]["rejected"]["1"]
    assert len(run.history) == 3 and all(torch.isfinite(v).all() for v in run.state.values() if v.is_floating_point())
    assert run.history[1]["num_clients"] == run.history[0]["num_clients"] - 1


# ------------------------------------------------------------------------------------------ issue 21
def test_modality_mirror_phase1_averages_the_audio_head_over_every_client_with_audio() -> None:
    """One round of the plan: clients with video send the audio head; it is Σ n_k θ_k / Σ n_k over all four."""
    params = small_params("modality_mirror", federation={"client_fraction": 1.0, "aggregator": "fedavg"})
    data = synthetic_av()
    plan = ModalityPlan(params, data)
    sampled, jobs = plan.jobs(1, plan.initial)
    updates = [job.fn(*job.args) for job in jobs]
    assert sampled == [0, 1, 2, 3]
    assert [j.args[-1] for j in jobs] == [{"av": 1.0, "audio": 1.0}] * 3 + [{"audio": 1.0}]
    for update in updates:
        groups = {k.split(".")[0] for k in update.state}
        assert groups == ({"audio", "audio_head", "visual", "fusion"} if update.client_id in data.video
                          else {"audio", "audio_head"})
    result = plan.combine(plan.initial, updates, {}, 1, 1)
    n = [u.num_examples for u in updates]
    for key in (k for k in plan.initial if k.startswith("audio_head.") and plan.initial[k].is_floating_point()):
        expected = sum(nk * u.state[key] for nk, u in zip(n, updates, strict=True)) / sum(n)
        assert torch.allclose(result.state[key], expected, atol=1e-6)
    assert result.record["participants"]["audio_head"] == [0, 1, 2, 3]
    # the behaviour before the option (w = 0): the audio head from the audio-only client alone
    before = ModalityPlan(small_params("modality_mirror", federation={"client_fraction": 1.0},
                                       modality={"audio_loss_weight": 0.0}), data)
    assert [j.args[-2:] for j in before.jobs(1, before.initial)[1]][0] == (False, {"av": 1.0})


def _phase1_branch(params: Params) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    spec = av_model_spec(params.model, params.modality, AUDIO, VISUAL, CLASSES)
    teacher = build(spec, torch.Generator().manual_seed(5))
    branch = {k: v.clone() for k, v in teacher.state_dict().items() if k.split(".")[0] in ("audio", "audio_head")}
    student = build(audio_branch_spec(spec), torch.Generator().manual_seed(6))
    student.load_state_dict(branch)  # as the stage loads the logged audio branch of phase 1
    return teacher, student, branch


def test_the_student_starts_from_the_phase1_audio_branch_or_fresh_weights() -> None:
    params = small_params("modality_mirror")
    teacher, student, branch = _phase1_branch(params)
    plan = DistillPlan(params, synthetic_av(), student, ("audio",), teacher, ("audio", "visual"))
    assert set(plan.initial) == set(branch) and all(torch.equal(plan.initial[k], branch[k]) for k in branch)
    fresh = small_params("modality_mirror", distill={"student_init": "random"})
    teacher, student, branch = _phase1_branch(fresh)
    plan = DistillPlan(fresh, synthetic_av(), student, ("audio",), teacher, ("audio", "visual"))
    drawn = build(audio_branch_spec(av_model_spec(fresh.model, fresh.modality, AUDIO, VISUAL, CLASSES)),
                  torch.Generator().manual_seed(fresh.federation.seed)).state_dict()
    assert all(torch.equal(plan.initial[k], drawn[k]) for k in drawn)
    assert any(not torch.equal(plan.initial[k], branch[k]) for k in branch if branch[k].is_floating_point())
    assert all(torch.equal(student.state_dict()[k], drawn[k]) for k in drawn)  # the flow's model, in place


def test_the_distill_learning_rate_is_the_distill_sections() -> None:
    params = small_params("modality_mirror", distill={"lr": 0.005})
    spec = distill_plan.DistillSpec(params.federation, params.distill)
    assert distill_plan.distill_settings(spec, 1).lr == 0.005


@pytest.mark.parametrize(("section", "values", "match"), [
    ("modality", {"audio_loss_weight": -0.1}, "audio_loss_weight"),
    ("modality", {"audio_loss_weight": "one"}, "audio_loss_weight"),
    ("distill", {"student_init": "phase2"}, "student_init"),
    ("distill", {"lr": 0.0}, "lr"),
])
def test_bad_issue21_params_are_refused(section: str, values: dict[str, Any], match: str) -> None:
    from fedcore.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        small_params("modality_mirror", **{section: values})


def test_issue21_defaults() -> None:
    params = small_params("modality_mirror")
    assert params.modality.audio_loss_weight == 1.0 and params.distill.student_init == "logged"
