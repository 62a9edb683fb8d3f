"""Audio-visual engine: modality-wise aggregation, the KD loss, the objectives of local training, the methods' phases,
the evaluation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedcore.aggregation import AGGREGATORS
from fedcore.aggregation.base import ClientUpdate
from fedcore.algorithms.base import LocalSettings
from fedcore.config import ModelConfig
from fedcore.errors import QuorumError
from fedcore.multimodal import (
    AV_METHODS,
    AudioBranch,
    AVClientData,
    AVModel,
    audio_branch,
    build_av_model,
    kd_loss,
    modality_wise,
    train_av_client,
    train_student,
)
from fedcore.multimodal.evaluate import evaluate_av
from fedcore.multimodal.models import FUSIONS, AttentionFusion
from fedcore.multimodal.train import accuracy

AUDIO_SHAPE = (1, 16, 20)


def _model(fusion: str = "concat", visual_shape: tuple[int, ...] = (1, 8, 8), seed: int = 0) -> AVModel:
    return build_av_model(audio_cfg=ModelConfig(name="cnn", width=4, depth=2), audio_shape=AUDIO_SHAPE,
                          visual_shape=visual_shape, num_classes=3, fusion=fusion, embed_dim=8, hidden_dim=8,
                          visual_width=4, dropout=0.0, generator=torch.Generator().manual_seed(seed))


def _data(n: int = 12, video: bool = True, seed: int = 0) -> AVClientData:
    g = torch.Generator().manual_seed(seed)
    return AVClientData(torch.randn(n, *AUDIO_SHAPE, generator=g),
                        torch.rand(n, 1, 8, 8, generator=g) if video else None,
                        torch.randint(0, 3, (n,), generator=g))


SETTINGS = LocalSettings(epochs=1, batch_size=4, lr=0.1, momentum=0.0, weight_decay=0.0)


# ------------------------------------------------------------------------------------------ modality-wise aggregation
def _update(client: int, n: int, values: dict[str, float]) -> ClientUpdate:
    return ClientUpdate(client, {k: torch.full((2,), v) for k, v in values.items()}, n, {})


def test_each_group_is_averaged_over_the_clients_that_hold_its_modality_only() -> None:
    """Hand-made 3 clients: 0 and 1 audio-visual (n=1, n=3), 2 audio-only (n=2)."""
    global_state = {k: torch.full((2,), -1.0) for k in
                    ("audio.w", "visual.w", "fusion.w", "audio_head.w", "visual_head.w")}
    updates = [
        _update(0, 1, {"audio.w": 1.0, "visual.w": 10.0, "fusion.w": 100.0}),
        _update(1, 3, {"audio.w": 2.0, "visual.w": 20.0, "fusion.w": 200.0}),
        _update(2, 2, {"audio.w": 4.0, "audio_head.w": 7.0}),
    ]
    result = modality_wise(AGGREGATORS.build("fedavg"), global_state, updates, 1)
    assert torch.allclose(result.state["audio.w"], torch.full((2,), (1 * 1 + 3 * 2 + 2 * 4) / 6))
    assert torch.allclose(result.state["visual.w"], torch.full((2,), (1 * 10 + 3 * 20) / 4))
    assert torch.allclose(result.state["fusion.w"], torch.full((2,), (1 * 100 + 3 * 200) / 4))
    assert torch.equal(result.state["audio_head.w"], torch.full((2,), 7.0))  # the audio-only client alone
    assert torch.equal(result.state["visual_head.w"], global_state["visual_head.w"])  # nobody sent it
    assert result.participants == {"audio": [0, 1, 2], "visual": [0, 1], "fusion": [0, 1], "audio_head": [2]}
    assert torch.equal(global_state["audio.w"], torch.full((2,), -1.0))  # not modified


def test_a_client_must_send_all_of_a_group_or_none_of_it() -> None:
    global_state = {"audio.a": torch.zeros(1), "audio.b": torch.zeros(1)}
    good = ClientUpdate(1, {"audio.a": torch.full((1,), 2.0), "audio.b": torch.full((1,), 4.0)}, 1, {})
    partial = ClientUpdate(0, {"audio.a": torch.ones(1)}, 1, {})
    stray = ClientUpdate(2, {"audio.a": torch.ones(1), "audio.b": torch.ones(1), "x.c": torch.ones(1)}, 1, {})
    result = modality_wise(AGGREGATORS.build("fedavg"), global_state, [partial, good, stray], 1)
    assert torch.equal(result.state["audio.a"], torch.full((1,), 2.0))  # the good client alone
    assert result.participants == {"audio": [1]}
    assert "all of a group or none" in result.rejected[0] and "extra ['x.c']" in result.rejected[2]
    with pytest.raises(QuorumError, match="all of a group or none"):
        modality_wise(AGGREGATORS.build("fedavg"), global_state, [partial], 1)


def test_a_non_finite_group_leaves_its_client_out_of_every_group() -> None:
    global_state = {"audio.w": torch.zeros(2), "visual.w": torch.zeros(2)}
    clean = ClientUpdate(0, {"audio.w": torch.full((2,), 1.0), "visual.w": torch.full((2,), 3.0)}, 1, {})
    poisoned = ClientUpdate(1, {"audio.w": torch.full((2,), 5.0),
                                "visual.w": torch.tensor([1.0, float("nan")])}, 1, {})
    result = modality_wise(AGGREGATORS.build("fedavg"), global_state, [clean, poisoned], 1,
                           failed={2: "training raised RuntimeError: boom"})
    assert torch.equal(result.state["audio.w"], torch.full((2,), 1.0))  # not averaged with the NaN client's audio
    assert result.participants == {"audio": [0], "visual": [0]}
    assert sorted(result.rejected) == [1, 2]
    assert "finite" in result.rejected[1] and "boom" in result.rejected[2]
    with pytest.raises(QuorumError, match="needs at least 2 accepted updates"):
        modality_wise(AGGREGATORS.build("fedavg"), global_state, [clean, poisoned], 1, min_accepted=2)


# ------------------------------------------------------------------------------------------ KD loss
def test_kd_loss_matches_a_hand_computation() -> None:
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 2])
    lambd, t = 0.7, 2.0

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(v / t) for v in row]
        return [e / sum(exps) for e in exps]

    ce = 0.0
    for row, y in zip(student.tolist(), labels.tolist(), strict=True):
        ce += -(row[y] - math.log(sum(math.exp(v) for v in row)))
    ce /= 2
    kl = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        p, q = softmax(t_row), softmax(s_row)
        kl += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    kl /= 2
    expected = ce + lambd * t * t * kl
    got = kd_loss(student, teacher, labels, lambd=lambd, temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(student, student, labels, lambd=5.0, temperature=t).item() == pytest.approx(ce, rel=1e-6)


def test_kd_gradient_reaches_the_student_only() -> None:
    student = torch.zeros(2, 3, requires_grad=True)
    teacher = torch.randn(2, 3, requires_grad=True)
    kd_loss(student, teacher, torch.tensor([0, 1]), lambd=1.0, temperature=1.0).backward()
    assert student.grad is not None and teacher.grad is None


# ------------------------------------------------------------------------------------------ local training
def test_a_client_sends_exactly_the_groups_its_tasks_train() -> None:
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cases = {("audio",): {"audio", "audio_head"}, ("av",): {"audio", "visual", "fusion"},
             ("audio", "visual"): {"audio", "audio_head", "visual", "visual_head"}, ("fusion",): {"fusion"}}
    for tasks, groups in cases.items():
        update = train_av_client(client_id=0, model=model, global_state=state, data=_data(), tasks=tasks,
                                 settings=SETTINGS, generator=torch.Generator().manual_seed(1))
        assert {k.split(".")[0] for k in update.state} == groups
        expected = [k for k in state if k.split(".")[0] in groups]
        assert sorted(update.state) == sorted(expected)  # every entry of those groups (BN buffers included)
        changed = {k.split(".")[0] for k in expected if not torch.equal(update.state[k], state[k])}
        assert changed == groups


def test_fusion_training_leaves_the_encoders_and_their_statistics_alone() -> None:
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    train_av_client(client_id=0, model=model, global_state=state, data=_data(), tasks=["fusion"],
                    settings=SETTINGS, generator=torch.Generator().manual_seed(1))
    after = model.state_dict()
    for key, value in state.items():
        if key.split(".")[0] in ("audio", "visual"):
            assert torch.equal(after[key], value), key


def test_missing_video_is_zero_filled_only_when_the_method_says_so() -> None:
    model = _model()
    state = model.state_dict()
    audio_only = _data(video=False)
    with pytest.raises(ValueError, match="has no video"):
        train_av_client(client_id=3, model=model, global_state=state, data=audio_only, tasks=["av"],
                        settings=SETTINGS, generator=torch.Generator().manual_seed(1))
    update = train_av_client(client_id=3, model=model, global_state=state, data=audio_only, tasks=["av"],
                             settings=SETTINGS, generator=torch.Generator().manual_seed(1), zero_fill=True)
    assert "visual.project.weight" in update.state


def test_local_training_is_deterministic_for_a_generator() -> None:
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    runs = [train_av_client(client_id=0, model=model, global_state=state, data=_data(), tasks=["av"],
                            settings=SETTINGS, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert all(torch.equal(runs[0].state[k], runs[1].state[k]) for k in runs[0].state)
    assert not all(torch.equal(runs[0].state[k], runs[2].state[k]) for k in runs[0].state)


def test_distillation_trains_the_student_and_never_the_teacher() -> None:
    teacher = _model(seed=1)
    teacher.eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = audio_branch(_model(seed=2))
    start = {k: v.clone() for k, v in student.state_dict().items()}
    update = train_student(client_id=0, student=student, student_state=start, teacher=teacher,
                           teacher_inputs=("audio", "visual"), data=_data(), settings=SETTINGS,
                           generator=torch.Generator().manual_seed(0), lambd=1.0, temperature=2.0)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())
    assert sorted(update.state) == sorted(start)
    assert any(not torch.equal(update.state[k], start[k]) for k in start)
    assert 0.0 <= update.metrics["teacher_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="has no video"):
        train_student(client_id=4, student=student, student_state=start, teacher=teacher,
                      teacher_inputs=("audio", "visual"), data=_data(video=False), settings=SETTINGS,
                      generator=torch.Generator().manual_seed(0), lambd=1.0, temperature=1.0)


def test_with_lambda_zero_distillation_is_plain_cross_entropy_training() -> None:
    student = audio_branch(_model(seed=2))
    start = {k: v.clone() for k, v in student.state_dict().items()}
    data = _data()
    kd = train_student(client_id=0, student=student, student_state=start, teacher=_model(seed=1).eval(),
                       teacher_inputs=("audio", "visual"), data=data, settings=SETTINGS,
                       generator=torch.Generator().manual_seed(0), lambd=0.0, temperature=1.0)
    # the same steps by hand: one epoch of SGD on cross-entropy in the generator's batch order
    student.load_state_dict(start)
    student.train()
    optimizer = torch.optim.SGD(student.parameters(), lr=SETTINGS.lr)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    for i in range(0, len(data), SETTINGS.batch_size):
        rows = order[i:i + SETTINGS.batch_size]
        optimizer.zero_grad()
        F.cross_entropy(student(data.audio[rows]), data.labels[rows]).backward()
        optimizer.step()
    assert all(torch.allclose(kd.state[k], v, atol=1e-6) for k, v in student.state_dict().items())


# ------------------------------------------------------------------------------------------ models and methods
def test_audio_branch_keys_match_the_av_model_and_copy_its_weights() -> None:
    model = _model()
    branch = audio_branch(model)
    assert isinstance(branch, AudioBranch)
    assert set(branch.state_dict()) == {k for k in model.state_dict() if k.split(".")[0] in ("audio", "audio_head")}
    x = torch.randn(2, *AUDIO_SHAPE)
    model.eval()
    branch.eval()
    assert torch.equal(branch(x), model.audio_logits(x))


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_every_fusion_maps_images_and_frame_clips_to_logits(fusion: str) -> None:
    for visual_shape in ((1, 8, 8), (3, 1, 8, 8)):
        model = _model(fusion, visual_shape)
        logits = model(torch.randn(2, *AUDIO_SHAPE), torch.randn(2, *visual_shape))
        assert logits.shape == (2, 3)


def test_attention_weights_are_a_distribution_over_the_modalities() -> None:
    fusion = AttentionFusion(embed_dim=4, hidden_dim=5, num_classes=3, dropout=0.0)
    weights = fusion.weights(torch.randn(6, 4), torch.zeros(6, 4))
    assert weights.shape == (6, 2)
    assert torch.allclose(weights.sum(dim=1), torch.ones(6))


def test_same_seed_same_model() -> None:
    a, b, c = _model(seed=3).state_dict(), _model(seed=3).state_dict(), _model(seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_method_plans() -> None:
    plan = {name: AV_METHODS.build(name).schedule(10, 3) for name in AV_METHODS.names()}
    assert [p.plan(True) for _, p in plan["unifl"]] == [("audio",)] * 10
    assert {p.plan(False) for _, p in plan["multifl"]} == {("av",)} and AV_METHODS.build("multifl").zero_fill
    harmony = plan["harmony"]
    assert [n for n, _ in harmony] == [1] * 7 + [2] * 3
    assert harmony[0][1].plan(True) == ("audio", "visual") and harmony[0][1].plan(False) == ("audio",)
    assert harmony[-1][1].plan(True) == ("fusion",) and harmony[-1][1].plan(False) == ()
    mirror = plan["modality_mirror"]
    # issue 21: a client with video trains the audio branch on audio beside the fused loss (weights 1, 1 by default)
    assert mirror[0][1].plan(True) == ("av", "audio") and mirror[0][1].plan(False) == ("audio",)
    assert mirror[0][1].weights(True) == {"av": 1.0, "audio": 1.0} and mirror[0][1].weights(False) == {"audio": 1.0}
    weighted = AV_METHODS.build("modality_mirror").schedule(10, 3, 0.25)[0][1]
    assert weighted.weights(True) == {"av": 1.0, "audio": 0.25} and weighted.weights(False) == {"audio": 1.0}
    before = AV_METHODS.build("modality_mirror").schedule(10, 3, 0.0)[0][1]  # w = 0: the fused loss alone
    assert before.plan(True) == ("av",) and before.weights(True) == {"av": 1.0}
    # the baselines ignore w: UniFL and Harmony already train the audio branch everywhere, MultiFL the fused model
    for name in ("unifl", "multifl", "harmony"):
        assert [(p.plan(v), p.weights(v)) for _, p in AV_METHODS.build(name).schedule(10, 3, 0.25) for v in (0, 1)] \
            == [(p.plan(v), p.weights(v)) for _, p in plan[name] for v in (0, 1)]
        assert all(set(p.weights(v).values()) <= {1.0} for _, p in plan[name] for v in (False, True))
    with pytest.raises(ValueError, match="fusion_rounds"):
        AV_METHODS.build("harmony").schedule(3, 3)
    with pytest.raises(ValueError, match="audio_loss_weight"):
        AV_METHODS.build("modality_mirror").schedule(10, 3, -1.0)


def test_an_audio_visual_client_of_modality_mirror_sends_the_audio_head_too() -> None:
    """Hand-made 3 clients: 0 and 1 audio-visual (n=1, n=3) now send the audio head, 2 audio-only (n=2)."""
    global_state = {k: torch.full((2,), -1.0) for k in ("audio.w", "visual.w", "fusion.w", "audio_head.w")}
    updates = [
        _update(0, 1, {"audio.w": 1.0, "visual.w": 10.0, "fusion.w": 100.0, "audio_head.w": 5.0}),
        _update(1, 3, {"audio.w": 2.0, "visual.w": 20.0, "fusion.w": 200.0, "audio_head.w": 6.0}),
        _update(2, 2, {"audio.w": 4.0, "audio_head.w": 7.0}),
    ]
    result = modality_wise(AGGREGATORS.build("fedavg"), global_state, updates, 1)
    # Σ_k n_k θ_k / Σ_k n_k over every client with audio: (1·5 + 3·6 + 2·7) / 6, not 7 (the audio-only client alone)
    assert torch.allclose(result.state["audio_head.w"], torch.full((2,), (1 * 5 + 3 * 6 + 2 * 7) / 6))
    assert torch.allclose(result.state["visual.w"], torch.full((2,), (1 * 10 + 3 * 20) / 4))
    assert result.participants["audio_head"] == [0, 1, 2] and result.participants["visual"] == [0, 1]


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_fused_plus_weighted_audio_loss_equals_a_hand_written_sgd_loop(weight: float) -> None:
    """``av`` + w·``audio``: the update carries the audio head, trained on CE(fused) + w·CE(audio branch)."""
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = _data(n=10)
    settings = LocalSettings(epochs=1, batch_size=4, lr=0.1, momentum=0.5, weight_decay=0.0)
    update = train_av_client(client_id=0, model=model, global_state=start, data=data, tasks=["av", "audio"],
                             settings=settings, generator=torch.Generator().manual_seed(3),
                             weights={"audio": weight})
    assert {k.split(".")[0] for k in update.state} == {"audio", "visual", "fusion", "audio_head"}
    reference = _model()
    reference.load_state_dict(start)
    reference.train()
    groups = [reference.audio, reference.visual, reference.fusion, reference.audio_head]
    optimizer = torch.optim.SGD([p for g in groups for p in g.parameters()], lr=0.1, momentum=0.5)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))
    for i in range(0, len(data), 4):
        rows = order[i:i + 4]
        optimizer.zero_grad()
        audio, visual, labels = data.audio[rows], data.visual[rows], data.labels[rows]  # type: ignore[index]
        loss = F.cross_entropy(reference(audio, visual), labels) \
            + weight * F.cross_entropy(reference.audio_logits(audio), labels)
        loss.backward()
        optimizer.step()
    trained = reference.state_dict()
    assert all(torch.allclose(update.state[k], trained[k], atol=1e-6) for k in update.state)
    head = [k for k in update.state if k.startswith("audio_head.")]
    assert head and any(not torch.equal(update.state[k], start[k]) for k in head)  # the head was trained


def test_task_weights_are_checked() -> None:
    model = _model()
    state = model.state_dict()
    for weights, match in (({"visual": 1.0}, "not trained"), ({"audio": -0.5}, ">= 0")):
        with pytest.raises(ValueError, match=match):
            train_av_client(client_id=0, model=model, global_state=state, data=_data(), tasks=["av", "audio"],
                            settings=SETTINGS, generator=torch.Generator().manual_seed(0), weights=weights)


def test_dropout_masks_come_from_the_client_generator_not_the_global_rng() -> None:
    model = build_av_model(audio_cfg=ModelConfig(name="cnn", width=4, depth=2), audio_shape=AUDIO_SHAPE,
                           visual_shape=(1, 8, 8), num_classes=3, fusion="concat", embed_dim=8, hidden_dim=8,
                           visual_width=4, dropout=0.5, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    runs = []
    for _ in range(2):
        torch.rand(1000)  # other threads drawing from the global RNG in between
        runs.append(train_av_client(client_id=0, model=model, global_state=state, data=_data(), tasks=["av"],
                                    settings=SETTINGS, generator=torch.Generator().manual_seed(9)))
    assert all(torch.equal(runs[0].state[k], runs[1].state[k]) for k in runs[0].state)
    assert all(m.generator is None for m in model.modules() if hasattr(m, "generator"))  # picklable afterwards


# ------------------------------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_evaluation_shares_the_audio_embedding_and_equals_the_forward_passes(fusion: str) -> None:
    model = build_av_model(audio_cfg=ModelConfig(name="cnn", width=4, depth=2), audio_shape=(1, 16, 20),
                           visual_shape=(1, 8, 8), num_classes=3, fusion=fusion, embed_dim=8, hidden_dim=8,
                           visual_width=4, dropout=0.1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    data = AVClientData(torch.randn(50, 1, 16, 20, generator=g), torch.rand(50, 1, 8, 8, generator=g),
                        torch.randint(0, 3, (50,), generator=g))
    model.eval()
    expected = {
        "audio_branch_accuracy": accuracy(lambda r: model.audio_logits(data.audio[r]), data.labels, 16),
        "av_accuracy": accuracy(lambda r: model(data.audio[r], data.visual[r]), data.labels, 16),  # type: ignore
        "zero_video_accuracy": accuracy(lambda r: model(data.audio[r], torch.zeros_like(data.visual[r])),  # type: ignore
                                        data.labels, 16),
    }
    multifl = evaluate_av(model, AV_METHODS.build("multifl"), data, 16)
    assert {k: multifl[k] for k in expected} == expected
    assert multifl["audio_accuracy"] == expected["zero_video_accuracy"]
    unifl = evaluate_av(model, AV_METHODS.build("unifl"), data, 7)
    assert unifl == {"audio_branch_accuracy": expected["audio_branch_accuracy"],
                     "audio_accuracy": expected["audio_branch_accuracy"]}


def test_audio_task_training_equals_a_hand_written_sgd_loop_on_the_audio_branch() -> None:
    """The objective in the one client loop: the same steps as plain SGD on the audio branch's cross-entropy."""
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = _data(n=10)
    settings = LocalSettings(epochs=2, batch_size=4, lr=0.1, momentum=0.5, weight_decay=0.01)
    update = train_av_client(client_id=0, model=model, global_state=start, data=data, tasks=["audio"],
                             settings=settings, generator=torch.Generator().manual_seed(3))
    reference = _model()
    reference.load_state_dict(start)
    reference.train()
    branch = [*reference.audio.parameters(), *reference.audio_head.parameters()]
    optimizer = torch.optim.SGD(branch, lr=0.1, momentum=0.5, weight_decay=0.01)
    g = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(2):
        order = torch.randperm(len(data), generator=g)
        losses = []
        for i in range(0, len(data), 4):
            rows = order[i:i + 4]
            optimizer.zero_grad()
            loss = F.cross_entropy(reference.audio_logits(data.audio[rows]), data.labels[rows])
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()) * len(rows))
    trained = reference.state_dict()
    assert all(torch.equal(update.state[k], trained[k]) for k in update.state)
    assert update.metrics["train_loss"] == pytest.approx(sum(losses) / len(data), rel=1e-12)
    assert update.metrics["num_batches"] == 6.0


def test_client_rows_come_as_audio_visual_pairs_with_their_labels() -> None:
    data = _data(n=6)
    (audio, visual), labels = data.batch(torch.tensor([4, 1]), torch.device("cpu"))
    assert visual is not None
    assert torch.equal(audio, data.audio[[4, 1]]) and torch.equal(labels, data.labels[[4, 1]])
    assert torch.equal(visual, data.visual[[4, 1]])  # type: ignore[index]
    (_, missing), _ = _data(n=6, video=False).batch(torch.tensor([0]), torch.device("cpu"))
    assert missing is None
