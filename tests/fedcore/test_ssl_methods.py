"""Self-supervised methods (fedcore/ssl/methods.py) and the objective hook of the local training loop."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Literal

import pytest
import torch
from torch import nn

from fedcore.aggregation import clone_state
from fedcore.aggregation.base import ClientUpdate
from fedcore.algorithms import ClientData, FedAvgClient, LocalSettings, train_client
from fedcore.algorithms.base import CrossEntropy, Objective, ObjectiveSession
from fedcore.config import ModelConfig, SSLConfig
from fedcore.models import build_model
from fedcore.models.groups import PARAM_GROUPS
from fedcore.ssl.losses import barlow_twins_loss, nt_xent, split_clips, valid_frames
from fedcore.ssl.methods import (
    ACOP,
    BYOL,
    SSL_METHODS,
    BarlowTwins,
    SimCLR,
    SSLModel,
    backbone_of,
    build_method,
)

CFG = ModelConfig(name="cnn", width=4, depth=2)
INPUT_SHAPE = (1, 16, 24)
SETTINGS = LocalSettings(epochs=2, batch_size=8, lr=0.01, momentum=0.9, weight_decay=1e-4)
SSL_NAMES = ["simclr", "barlow_twins", "byol", "acop"]
VIEW_NAMES = ["simclr", "barlow_twins", "byol"]  # the two-view methods, which cannot use a batch of one
SMALL = {"projector_dim": 8, "hidden_dim": 16}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these tiny models run faster without thread hand-offs (and alongside other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _method(name: str) -> Objective:
    return SSL_METHODS.build(name, **SMALL)


def _model(method: Objective, seed: int = 0) -> nn.Module:
    return method.build_model(CFG, 10, INPUT_SHAPE, torch.Generator().manual_seed(seed))


def _data(n: int = 20, seed: int = 0) -> ClientData:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, *INPUT_SHAPE, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return ClientData(features=features, labels=labels)


def _train(method: Objective | None, data: ClientData, *, model_seed: int = 0, seed: int = 5,
           settings: LocalSettings = SETTINGS) -> ClientUpdate:
    model = _model(method if method is not None else Objective(), model_seed)
    kwargs = {} if method is None else {"objective": method}
    return train_client(client_id=3, model=model, global_state=clone_state(model.state_dict()), data=data,
                        algorithm=FedAvgClient(), settings=settings, generator=torch.Generator().manual_seed(seed),
                        **kwargs)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("name", SSL_NAMES)
def test_build_model_is_an_ssl_model_giving_embeddings(name: str) -> None:
    method = SSL_METHODS.build(name)
    model = method.build_model(CFG, 10, INPUT_SHAPE, torch.Generator().manual_seed(0))
    assert isinstance(model, SSLModel)
    assert isinstance(model.backbone.classifier, nn.Identity)
    model.eval()
    out = model(torch.randn(3, *INPUT_SHAPE))
    assert out.shape == (3, model.embedding_dim)
    # the embedding size is the input size of the classifier that was removed
    classifier = build_model(CFG, 10, INPUT_SHAPE, torch.Generator().manual_seed(0)).classifier
    assert model.embedding_dim == classifier.in_features
    assert method.uses_labels is False


@pytest.mark.parametrize("name", SSL_NAMES)
def test_build_model_is_a_function_of_the_seed(name: str) -> None:
    method = _method(name)
    same_a, same_b, other = _model(method, 0).state_dict(), _model(method, 0).state_dict(), _model(method, 1)
    assert _equal(same_a, same_b)
    assert not _equal(same_a, other.state_dict())
    # the heads are drawn from the generator too (after the backbone), so they also differ by seed
    assert not torch.equal(same_a["projector.0.weight"], other.state_dict()["projector.0.weight"])


def test_backbone_weights_are_those_of_the_classifier_model_drawn_first() -> None:
    """The backbone is drawn first from the generator: it equals the registered model built from the same seed."""
    model = _model(_method("simclr"), 4)
    classifier = build_model(CFG, 1, INPUT_SHAPE, torch.Generator().manual_seed(4)).state_dict()
    backbone = {k.removeprefix("backbone."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    expected = {k: v for k, v in classifier.items() if not k.startswith("classifier.")}
    assert _equal(backbone, expected)


def test_none_is_the_supervised_objective_building_the_plain_classifier() -> None:
    objective = SSL_METHODS.build("none")
    assert type(objective) is Objective
    assert objective.uses_labels is True
    model = objective.build_model(CFG, 10, INPUT_SHAPE, torch.Generator().manual_seed(0))
    assert not isinstance(model, SSLModel)
    reference = build_model(CFG, 10, INPUT_SHAPE, torch.Generator().manual_seed(0))
    assert _equal(model.state_dict(), reference.state_dict())
    model.eval()
    assert model(torch.randn(2, *INPUT_SHAPE)).shape == (2, 10)
    assert isinstance(objective.start(model), CrossEntropy)


def test_registry_lists_the_methods() -> None:
    assert SSL_METHODS.names() == ["acop", "barlow_twins", "byol", "none", "simclr"]
    with pytest.raises(ValueError, match="Available: acop, barlow_twins, byol, none, simclr"):
        SSL_METHODS.build("moco")


@pytest.mark.parametrize("name", SSL_NAMES)
def test_parameter_groups_split_backbone_and_heads(name: str) -> None:
    model = _model(_method(name))
    keys = list(model.state_dict())
    backbone = PARAM_GROUPS.build("backbone").keys(model)
    head = PARAM_GROUPS.build("head").keys(model)
    assert backbone == [k for k in keys if k.startswith("backbone.")]
    heads = ("projector.", "predictor.") if name == "byol" else ("projector.",)
    assert head == [k for k in keys if k.startswith(heads)]
    assert any(k.startswith("projector.") for k in head)
    assert any(k.startswith("predictor.") for k in head) == (name == "byol")
    assert sorted(backbone + head) == sorted(keys)


# ------------------------------------------------------------------------------------------------ train_client
@pytest.mark.parametrize("name", SSL_NAMES)
def test_train_client_with_each_method(name: str) -> None:
    method = _method(name)
    data = _data()
    update = _train(method, data)
    assert math.isfinite(update.metrics["train_loss"])
    assert update.num_examples == 20
    assert update.metrics["num_batches"] == 6.0  # 2 epochs of batches 8, 8, 4
    if name == "acop":
        assert 0.0 <= update.metrics["train_accuracy"] <= 1.0
    else:
        assert "train_accuracy" not in update.metrics
    start = _model(method).state_dict()
    assert not torch.equal(update.state["backbone.features.0.0.weight"], start["backbone.features.0.0.weight"])
    assert not torch.equal(update.state["projector.0.weight"], start["projector.0.weight"])
    # deterministic for the same generator seed, different for another
    again = _train(method, data)
    assert _equal(update.state, again.state)
    assert update.metrics == again.metrics
    assert not _equal(update.state, _train(method, data, seed=6).state)


@pytest.mark.parametrize("name", SSL_NAMES)
def test_train_client_ignores_the_labels(name: str) -> None:
    method = _method(name)
    data = _data()
    shuffled = ClientData(data.features, data.labels[torch.randperm(20, generator=torch.Generator().manual_seed(1))])
    replaced = ClientData(data.features, torch.full((20,), 7, dtype=torch.int64))
    assert not torch.equal(shuffled.labels, data.labels)
    reference = _train(method, data)
    for other in (shuffled, replaced):
        update = _train(method, other)
        assert _equal(update.state, reference.state)
        assert update.metrics == reference.metrics


@pytest.mark.parametrize("name", VIEW_NAMES)
def test_two_view_methods_skip_a_batch_of_one(name: str) -> None:
    """17 examples in batches of 8: 8, 8, 1; the batch of one is skipped, so 2 steps per epoch."""
    update = _train(_method(name), _data(17))
    assert update.metrics["num_batches"] == 4.0
    assert math.isfinite(update.metrics["train_loss"])
    with pytest.raises(ValueError, match="no batch"):
        _train(_method(name), _data(1))


def test_acop_uses_a_batch_of_one() -> None:
    """ACOP's batch of one is N clips through the backbone and one order to classify: it is not skipped."""
    update = _train(_method("acop"), _data(17))
    assert update.metrics["num_batches"] == 6.0
    assert _train(_method("acop"), _data(1)).metrics["num_batches"] == 2.0


def test_supervised_default_equals_the_explicit_objective() -> None:
    data = _data()
    default = _train(None, data)
    explicit = _train(Objective(), data)
    assert _equal(default.state, explicit.state)
    assert default.metrics == explicit.metrics
    assert "train_accuracy" in default.metrics
    assert default.metrics["num_batches"] == 6.0


def test_train_client_calls_the_session_hooks() -> None:
    """train_client uses the objective's session for every batch and calls after_step after each step."""
    calls: list[str] = []

    class Recording(Objective):
        def start(self, model: nn.Module) -> ObjectiveSession:
            calls.append("start")
            inner = CrossEntropy(model)

            class Session(ObjectiveSession):
                def loss(self, inputs, labels, generator):  # noqa: ANN001, ANN202
                    calls.append(f"loss{inputs.shape[0]}")
                    return None if inputs.shape[0] < 8 else inner.loss(inputs, labels, generator)

                def after_step(self) -> None:
                    calls.append("after")

            return Session()

    settings = LocalSettings(epochs=1, batch_size=8, lr=0.01, momentum=0.0, weight_decay=0.0)
    update = _train(Recording(), _data(20), settings=settings)
    assert calls == ["start", "loss8", "after", "loss8", "after", "loss4"]  # the skipped batch: no after_step
    assert update.metrics["num_batches"] == 2.0


# ------------------------------------------------------------------------------------------------ sessions
@pytest.mark.parametrize("name", ["simclr", "barlow_twins"])
def test_session_loss_is_the_loss_of_the_projected_views(name: str) -> None:
    """The session draws two views from its generator: the same seed reproduces them, and the loss."""
    if name == "simclr":
        method: SimCLR | BarlowTwins = SimCLR(temperature=0.3, **SMALL)
        def loss_fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return nt_xent(a, b, 0.3)
    else:
        method = BarlowTwins(lambd=0.01, **SMALL)
        def loss_fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return barlow_twins_loss(a, b, 0.01)
    model = _model(method)
    model.train()
    x = torch.randn(6, *INPUT_SHAPE, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(6, dtype=torch.int64)
    session = method.start(model)
    loss, correct = session.loss(x, labels, torch.Generator().manual_seed(11))
    assert correct is None
    first, second = method.views(x, torch.Generator().manual_seed(11))
    assert not torch.equal(first, second)
    expected = loss_fn(model.projector(model.backbone(first)), model.projector(model.backbone(second)))
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
    other, _ = session.loss(x, labels, torch.Generator().manual_seed(12))
    assert not torch.allclose(other, expected)


@pytest.mark.parametrize("name", VIEW_NAMES)
def test_session_returns_none_for_a_batch_of_one(name: str) -> None:
    method = _method(name)
    session = method.start(_model(method))
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert session.loss(torch.randn(1, *INPUT_SHAPE), torch.zeros(1, dtype=torch.int64), generator) is None
    assert torch.equal(generator.get_state(), state)  # nothing drawn


@pytest.mark.parametrize("name", SSL_NAMES)
def test_session_needs_an_ssl_model(name: str) -> None:
    with pytest.raises(TypeError, match="SSLModel"):
        _method(name).start(build_model(CFG, 10, INPUT_SHAPE, torch.Generator().manual_seed(0)))


def test_byol_target_is_an_ema_of_the_online_network_without_gradient() -> None:
    tau = 0.9
    method = BYOL(tau=tau, **SMALL)
    model = _model(method)
    model.train()
    session = method.start(model)
    online = {f"{prefix}.{name}": p for prefix, module in (("0", model.backbone), ("1", model.projector))
              for name, p in module.named_parameters()}
    target = dict(session.target.named_parameters())
    assert target.keys() == online.keys()
    assert all(torch.equal(target[k], online[k]) for k in target)  # a copy of the online network at the start
    assert all(target[k].data_ptr() != online[k].data_ptr() for k in target)
    old_target = {k: v.detach().clone() for k, v in target.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(6, *INPUT_SHAPE, generator=torch.Generator().manual_seed(3))
    loss, correct = session.loss(x, torch.zeros(6, dtype=torch.int64), torch.Generator().manual_seed(4))
    assert correct is None and math.isfinite(loss.item())
    loss.backward()
    assert all(p.grad is None for p in session.target.parameters())
    assert model.predictor[0].weight.grad is not None
    optimizer.step()
    session.after_step()
    moved = [k for k in online if not torch.equal(online[k], old_target[k])]
    assert "1.0.weight" in moved  # the projector's first layer took a step
    for key in online:
        expected = tau * old_target[key] + (1 - tau) * online[key].detach()
        torch.testing.assert_close(target[key], expected, rtol=1e-6, atol=1e-7)
    # by hand on one weight
    w_old, w_new = old_target["1.0.weight"][0, 0].item(), online["1.0.weight"].detach()[0, 0].item()
    assert w_old != w_new
    assert target["1.0.weight"][0, 0].item() == pytest.approx(0.9 * w_old + 0.1 * w_new, rel=1e-6)
    assert not torch.equal(target["1.0.weight"], online["1.0.weight"])


def test_byol_target_is_not_in_the_model_state() -> None:
    method = BYOL(**SMALL)
    model = _model(method)
    keys = set(model.state_dict())
    method.start(model)
    assert set(model.state_dict()) == keys
    assert all(k.startswith(("backbone.", "projector.", "predictor.")) for k in keys)


# ------------------------------------------------------------------------------------------------ ACOP
def _window_offset(clip: torch.Tensor, original: torch.Tensor) -> int | None:
    """The start of the window of ``original`` (last axis) that equals ``clip``, or None."""
    width = clip.shape[-1]
    found = [o for o in range(original.shape[-1] - width + 1) if torch.equal(original[..., o : o + width], clip)]
    return found[0] if len(found) == 1 else None


def test_acop_cut_takes_a_contiguous_window_of_each_clip() -> None:
    x = torch.randn(8, 1, 4, 25, generator=torch.Generator().manual_seed(0))  # T // 3 = 8 (one frame dropped)
    cut = ACOP(clips=3, gap=0.25).cut(x, torch.Generator().manual_seed(1))
    assert cut.shape == (8, 3, 1, 4, math.ceil(0.75 * 8)) == (8, 3, 1, 4, 6)
    offsets = set()
    for b in range(8):
        for i in range(3):
            offset = _window_offset(cut[b, i], x[b, :, :, 8 * i : 8 * (i + 1)])
            assert offset is not None, (b, i)
            assert 0 <= offset <= 2
            offsets.add(offset)
    assert offsets == {0, 1, 2}  # the offsets are random: 24 draws cover every start


def test_acop_cut_is_a_function_of_the_generator() -> None:
    x = torch.randn(4, 1, 4, 24, generator=torch.Generator().manual_seed(0))
    method = ACOP(clips=3, gap=0.5)
    a = method.cut(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, method.cut(x, torch.Generator().manual_seed(3)))
    assert a.shape == (4, 3, 1, 4, 4)
    assert not torch.equal(a, method.cut(x, torch.Generator().manual_seed(4)))


def test_acop_cut_without_gap_is_split_clips() -> None:
    x = torch.randn(2, 1, 4, 25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ACOP(clips=3, gap=0.0).cut(x, torch.Generator().manual_seed(1)), split_clips(x, 3))
    assert torch.equal(ACOP(clips=2, gap=0.0).cut(x, torch.Generator().manual_seed(1)), split_clips(x, 2))


@pytest.mark.parametrize(("clips", "classes"), [(2, 2), (3, 6), (4, 24)])
def test_acop_order_classifier_has_one_output_per_order(clips: int, classes: int) -> None:
    method = ACOP(clips=clips, **SMALL)
    model = _model(method)
    assert model.predictor is None
    assert model.projector[-1].out_features == classes
    assert model.projector[0].in_features == clips * model.embedding_dim
    model.eval()
    assert model.projector(torch.randn(2, clips * model.embedding_dim)).shape == (2, classes)


# ACOP clips from the valid span (issue 21)
PAD = -1.0  # below every real value of _padded: the padding frames hold the example's minimum, as pad: end leaves


def _padded(valid: list[int], frames: int = 30, mels: int = 4) -> torch.Tensor:
    """``(B, 1, mels, frames)``: example ``b`` holds frame ``t + 1 + m / 100`` in bin ``m`` for ``t < valid[b]``,
    then :data:`PAD` (so a real value names its frame: ``round(value) - 1``)."""
    x = torch.full((len(valid), 1, mels, frames), PAD)
    for b, v in enumerate(valid):
        x[b, 0, :, :v] = torch.arange(1, v + 1, dtype=torch.float32) + torch.arange(mels)[:, None] / 100
    return x


def _frames_of(clip: torch.Tensor) -> list[int | None]:
    """The source frame of each frame of ``clip`` (C, M, t'), None for a padding frame."""
    return [None if bool((clip[..., j] == PAD).all()) else round(float(clip[0, 0, j])) - 1
            for j in range(clip.shape[-1])]


@pytest.mark.parametrize("gap", [0.0, 0.25, 0.5])
def test_acop_valid_span_cuts_ordered_clips_from_the_real_frames_only(gap: float) -> None:
    x = _padded([12, 20, 30, 7])  # a 30-frame row padded after 12, 20 or 7 real frames, and one not padded
    cut = ACOP(clips=3, gap=gap).cut(x, torch.Generator().manual_seed(1))
    width = math.ceil((1 - gap) * 10)
    assert cut.shape == (4, 3, 1, 4, width)
    for b, valid in enumerate([12, 20, 30, 7]):
        length = valid // 3
        kept = max(1, math.ceil((1 - gap) * length))
        for i in range(3):
            frames = _frames_of(cut[b, i])
            real = [f for f in frames[:kept] if f is not None]
            assert frames[kept:] == [None] * (width - kept), (b, i)  # padded at the end with the padding
            assert len(real) == kept, (b, i)
            assert real == list(range(real[0], real[0] + kept)), (b, i)  # contiguous
            assert i * length <= real[0] and real[-1] < (i + 1) * length, (b, i)  # inside clip i of the span
            assert torch.equal(cut[b, i, ..., :kept], x[b, ..., real[0] : real[0] + kept])
    if gap == 0.0:  # no crop: the clips tile the span exactly; an unpadded row gives split_clips' clips
        assert _frames_of(cut[0, 2]) == [8, 9, 10, 11, None, None, None, None, None, None]
        assert torch.equal(cut[2], split_clips(x[2:3], 3)[0])


def test_acop_valid_span_skips_leading_padding_and_falls_back_on_a_row_of_padding() -> None:
    x = torch.cat([torch.full((1, 1, 4, 6), PAD), _padded([18], frames=24)], dim=-1)  # pad: center-like
    x = torch.cat([x, torch.full_like(x, 3.0)])  # the second row is constant: all padding
    cut = ACOP(clips=3, gap=0.0).cut(x, torch.Generator().manual_seed(0))
    assert [_frames_of(cut[0, i])[:6] for i in range(3)] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11],
                                                             [12, 13, 14, 15, 16, 17]]
    assert _frames_of(cut[0, 0])[6:] == [None] * 4
    assert torch.equal(cut[1], split_clips(x[1:], 3)[0])  # no span to cut from: the whole row, as span: all


def test_acop_span_all_keeps_the_old_cut_padding_included() -> None:
    x = _padded([12, 20])
    assert torch.equal(ACOP(clips=3, gap=0.0, span="all").cut(x, torch.Generator()), split_clips(x, 3))
    cut = ACOP(clips=3, gap=0.25, span="all").cut(x, torch.Generator().manual_seed(1))
    assert cut.shape == (2, 3, 1, 4, 8)
    windows = split_clips(x, 3)
    for b in range(2):
        for i in range(3):
            assert _window_offset(cut[b, i], windows[b, i]) is not None or torch.all(cut[b, i] == PAD)
    assert _frames_of(cut[0, 2]) == [None] * 8  # clip 3 of the 12-frame example is all padding


def test_acop_tiled_features_have_no_span_to_find() -> None:
    clip = _padded([10], frames=10)
    tiled = clip.repeat(1, 1, 1, 3)  # pad: repeat of a 10-frame clip to 30 frames
    assert [t.tolist() for t in valid_frames(tiled)] == [[0], [30]]
    clips = ACOP(clips=3, gap=0.0).cut(tiled, torch.Generator())
    assert torch.equal(clips[0, 0], clips[0, 2])  # clip 3 is a copy of clip 1: the order cannot be told


def test_acop_reads_the_spans_from_the_reference_batch() -> None:
    x = _padded([12, 20, 9])
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # hides the padding
    method = ACOP(clips=3, gap=0.25)
    cut = method.cut(noisy, torch.Generator().manual_seed(2), reference=x)
    index = method.cut(torch.arange(30.0).expand_as(x).contiguous(), torch.Generator().manual_seed(2),
                       reference=x)[:, :, :1, :1].long()  # the frames cut, read back from a frame ramp
    assert torch.equal(cut, torch.gather(noisy.unsqueeze(1).expand(3, 3, 1, 4, 30), -1, index.expand_as(cut)))
    assert index[0].max() < 13 and index[2, :, 0, 0, :3].max() < 9  # real frames and the first padding frame
    with pytest.raises(ValueError, match="'reference'"):
        method.cut(x, torch.Generator(), reference=x[:, :, :, :20])


@pytest.mark.parametrize(("pad", "samples", "span"), [
    ("end", 7000, (0, 45)),        # frames centred before sample 7000 + win/2: 1 + (7000 + 199) // 160
    ("center", 7000, (27, 74)),    # 4500 zeros on each side
    ("end", 24000, (0, 101)),      # cropped to 1 s: no padding
    ("repeat", 7000, (0, 101)),    # tiled: nothing to find
])
def test_valid_frames_of_stored_log_mel(pad: Literal["end", "center", "repeat"], samples: int,
                                        span: tuple[int, int]) -> None:
    from fedcore.config import FeaturesConfig
    from fedcore.data.features import LogMelExtractor

    extractor = LogMelExtractor(FeaturesConfig(pad=pad, clip_seconds=1.0))
    wave = 0.1 * torch.randn(samples, generator=torch.Generator().manual_seed(0))
    stored = extractor(wave, 16000).to(torch.float16).to(torch.float32)  # features.dtype: float16
    normalised = (stored - 3.0) / 2.5
    start, stop = valid_frames(normalised[None, None])
    assert (int(start), int(stop)) == span


def test_acop_session_uses_padded_examples() -> None:
    method = ACOP(clips=3, gap=0.25, augment=[{"name": "noise", "p": 1.0}], **SMALL)
    x = torch.full((4, *INPUT_SHAPE), -2.0)
    x[..., :9] = torch.randn(4, 1, 16, 9, generator=torch.Generator().manual_seed(0))
    loss, correct = method.start(_model(method)).loss(x, torch.zeros(4, dtype=torch.int64),
                                                      torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item()) and 0 <= correct <= 4


def test_acop_session_counts_correct_orders() -> None:
    method = ACOP(clips=3, gap=0.25, **SMALL)
    model = _model(method)
    session = method.start(model)
    loss, correct = session.loss(torch.randn(5, *INPUT_SHAPE), torch.zeros(5, dtype=torch.int64),
                                 torch.Generator().manual_seed(0))
    assert isinstance(correct, int) and 0 <= correct <= 5
    # untrained: cross-entropy near log(6)
    assert loss.item() == pytest.approx(math.log(6), rel=0.5)


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(("factory", "options", "option"), [
    (SimCLR, {"temperature": 0.0}, "temperature"),
    (SimCLR, {"temperature": -0.5}, "temperature"),
    (SimCLR, {"temperature": float("nan")}, "temperature"),
    (SimCLR, {"temperature": float("inf")}, "temperature"),
    (BarlowTwins, {"lambd": -0.001}, "lambd"),
    (BarlowTwins, {"lambd": float("nan")}, "lambd"),
    (BYOL, {"tau": 1.0}, "tau"),
    (BYOL, {"tau": -0.1}, "tau"),
    (SimCLR, {"temperature": True}, "temperature"),
    (SimCLR, {"temperature": "0.5"}, "temperature"),
    (BarlowTwins, {"lambd": False}, "lambd"),
    (BYOL, {"tau": "0.5"}, "tau"),
    (ACOP, {"gap": None}, "gap"),
    (SimCLR, {"projector_dim": 0}, "projector_dim"),
    (BarlowTwins, {"projector_dim": 2.5}, "projector_dim"),
    (BYOL, {"projector_dim": True}, "projector_dim"),
    (ACOP, {"hidden_dim": 0}, "hidden_dim"),
    (ACOP, {"clips": 1}, "clips"),
    (ACOP, {"clips": 6}, "clips"),
    (ACOP, {"clips": True}, "clips"),
    (ACOP, {"clips": 3.0}, "clips"),
    (ACOP, {"gap": 1.0}, "gap"),
    (ACOP, {"gap": -0.1}, "gap"),
    (ACOP, {"span": "tiled"}, "span"),
    (ACOP, {"span": None}, "span"),
])
def test_bad_options_are_rejected_naming_the_option(factory: type, options: dict, option: str) -> None:
    with pytest.raises(ValueError, match=f"'{option}'"):
        factory(**options)


def test_edge_values_are_accepted() -> None:
    assert BarlowTwins(lambd=0.0).lambd == 0.0
    assert BYOL(tau=0.0).tau == 0.0
    assert ACOP(clips=5, gap=0.0).orders[-1] == (4, 3, 2, 1, 0)
    assert SimCLR(projector_dim=1, hidden_dim=1).projector_dim == 1


def test_backbone_of_needs_a_linear_classifier() -> None:
    with pytest.raises(ValueError, match="classifier"):
        backbone_of(nn.Sequential(nn.Linear(4, 2)))

    class Wrong(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = nn.Sequential(nn.Linear(4, 2))

    with pytest.raises(ValueError, match="Sequential"):
        backbone_of(Wrong())
    model = build_model(CFG, 10, INPUT_SHAPE, torch.Generator().manual_seed(0))
    in_features = model.classifier.in_features
    same, dim = backbone_of(model)
    assert same is model and dim == in_features
    assert isinstance(model.classifier, nn.Identity)
    model.eval()
    assert model(torch.randn(2, *INPUT_SHAPE)).shape == (2, dim)


def test_build_method_takes_each_method_its_own_options() -> None:
    assert build_method("simclr", {"temperature": 0.5}).temperature == 0.5
    assert build_method("barlow_twins", {"lambd": 0.1}).lambd == 0.1
    assert build_method("byol", {"tau": 0.5}).tau == 0.5
    acop = build_method("acop", {"clips": 4, "gap": 0.1})
    assert (acop.clips, acop.gap) == (4, 0.1)
    assert type(build_method("none", {})) is Objective


def test_build_method_passes_the_shared_head_and_augment_options() -> None:
    method = build_method("simclr", {"temperature": 0.5, "projector_dim": 7, "hidden_dim": 9,
                                     "augment": [{"name": "gain", "p": 1.0}]})
    assert (method.projector_dim, method.hidden_dim) == (7, 9)


@pytest.mark.parametrize(("name", "options", "unknown"), [
    ("simclr", {"temperature": 0.5, "tau": 0.5}, "['tau']"),  # another method's option
    ("byol", {"temprature": 0.5, "lambd": 0.1}, "['lambd', 'temprature']"),
    ("none", {"projector_dim": 8}, "['projector_dim']"),  # supervised takes no options
])
def test_build_method_refuses_an_option_its_method_does_not_take(name: str, options: dict, unknown: str) -> None:
    with pytest.raises(ValueError, match=rf"^ssl method {name!r}: unknown options {re.escape(unknown)}; it takes"):
        build_method(name, options)


def test_build_method_refuses_an_unknown_method() -> None:
    with pytest.raises(ValueError, match="Unknown ssl_method 'moco'"):
        build_method("moco", {})


@pytest.mark.parametrize("method", ["simclr", "barlow_twins", "acop", "byol"])
def test_the_ssl_section_reaches_the_built_method(method: str) -> None:
    options = {"simclr": {"temperature": 0.5}, "barlow_twins": {"lambd": 0.25}, "acop": {"clips": 2, "gap": 0.5},
               "byol": {"tau": 0.9}}
    ssl = SSLConfig(method=method, projector_dim=7, hidden_dim=9, options=options)
    built = build_method(ssl.method, ssl.method_kwargs())
    assert (built.projector_dim, built.hidden_dim) == (7, 9)
    assert {name: getattr(built, name) for name in options[method]} == options[method]
