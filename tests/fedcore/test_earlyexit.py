"""Early-exit models and local training: only layers up to the exit run, train and travel; compute is counted."""

from __future__ import annotations

import pytest
import torch

from fedcore.algorithms.base import ClientData, LocalSettings
from fedcore.config import ModelConfig
from fedcore.earlyexit.models import EarlyExitModel, build_exit_model
from fedcore.earlyexit.train import PLAIN_SGD, ExitDepth, exit_accuracies, train_exit_client

SHAPE = (1, 16, 24)
SETTINGS = LocalSettings(epochs=1, batch_size=8, lr=0.05, momentum=0.0, weight_decay=0.0)
TINY_W2V = {"embed_dim": 16, "heads": 2, "ff_dim": 32, "pos_conv_kernel": 4, "pos_conv_groups": 2,
            "conv": [[8, 10, 5], [8, 3, 2], [8, 3, 2]]}


def _model(depth: int = 4, exits: tuple[int, ...] = (1, 2, 4), seed: int = 0) -> EarlyExitModel:
    return build_exit_model("logmel_transformer", input_shape=SHAPE, cfg=ModelConfig(name="transformer", width=8,
                            depth=depth), options={}, exits=exits, num_classes=3, head="linear",
                            generator=torch.Generator().manual_seed(seed))


def _data(n: int = 16) -> ClientData:
    g = torch.Generator().manual_seed(0)
    return ClientData(torch.randn(n, *SHAPE, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_a_client_runs_only_the_layers_up_to_its_exit() -> None:
    model = _model()
    ran: list[int] = []
    for i, layer in enumerate(model.backbone.layers):
        layer.register_forward_hook(lambda *_, i=i: ran.append(i + 1))
    out = model.exit_logits(torch.randn(2, *SHAPE), 2)
    assert sorted(out) == [1, 2] and ran == [1, 2]
    with pytest.raises(ValueError, match="exits"):
        model.exit_logits(torch.randn(2, *SHAPE), 3)


def test_trained_keys_stop_at_the_exit_and_take_its_head_or_all_heads_below() -> None:
    model = _model()
    keys = model.trained_keys(2, deep_supervision=False)
    assert max(model.layer_of(k) for k in keys) == 2
    assert {k.split(".")[1] for k in keys if k.startswith("heads.")} == {"2"}
    deep = model.trained_keys(2, deep_supervision=True)
    assert {k.split(".")[1] for k in deep if k.startswith("heads.")} == {"1", "2"}
    assert set(model.trained_keys(4, False)) | {k for k in model.state_dict() if k.startswith("heads.")} == set(
        model.state_dict())


def test_a_client_sends_exactly_what_it_trained_and_leaves_deeper_layers_alone() -> None:
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    update = train_exit_client(client_id=0, model=model, global_state=start, data=_data(), depth=2,
                               settings=SETTINGS, generator=torch.Generator().manual_seed(1))
    assert sorted(update.state) == sorted(model.trained_keys(2, False))
    assert all(not torch.equal(update.state[k], start[k]) for k in update.state if model.layer_of(k) in (1, 2)
               and k.endswith("weight"))
    after = model.state_dict()
    assert all(torch.equal(after[k], start[k]) for k in start if model.layer_of(k) > 2 or k.startswith("heads.4"))
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert update.metrics["depth"] == 2.0 and update.metrics["bytes_sent"] > 0


def test_counted_compute_grows_with_depth_and_with_deep_supervision() -> None:
    model = _model()
    start = model.state_dict()
    flops = {}
    for depth, deep in ((1, False), (2, False), (4, False), (4, True)):
        flops[depth, deep] = train_exit_client(client_id=0, model=model, global_state=start, data=_data(),
                                               depth=depth, settings=SETTINGS, generator=torch.Generator(),
                                               deep_supervision=deep).metrics["train_flops"]
    assert flops[1, False] < flops[2, False] < flops[4, False] < flops[4, True]
    # per layer the same work: layers 2..4 cost about 3 times layer 2 alone (heads and stem aside)
    per_layer = flops[2, False] - flops[1, False]
    assert flops[4, False] - flops[2, False] == pytest.approx(2 * per_layer, rel=0.05)


def test_local_training_is_deterministic() -> None:
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = (train_exit_client(client_id=0, model=model, global_state=start, data=_data(), depth=4,
                              settings=SETTINGS, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_the_exit_objective_trains_only_up_to_its_depth_and_restores_requires_grad_when_training_raises() -> None:
    from fedcore.algorithms.base import train_client

    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    session = ExitDepth(2).start(model)
    assert {id(p) for p in session.parameters(model)} == {
        id(p) for name, p in model.named_parameters() if name in set(model.trained_keys(2, False))}
    assert not any(p.requires_grad for name, p in model.named_parameters() if model.layer_of(name) > 2)
    session.finish()
    assert all(p.requires_grad for p in model.parameters())
    bad = ClientData(torch.full((8, *SHAPE), float("nan")), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(FloatingPointError, match="client 3"):
        train_client(client_id=3, model=model, global_state=start, data=bad, algorithm=PLAIN_SGD,
                     settings=SETTINGS, generator=torch.Generator(), objective=ExitDepth(2))
    assert all(p.requires_grad for p in model.parameters())


def test_wav2vec2_backbone_freezes_its_cnn_and_exits_after_its_layers() -> None:
    model = build_exit_model("wav2vec2", input_shape=(1, 1, 4000), cfg=ModelConfig(name="transformer", width=16,
                             depth=3), options=TINY_W2V, exits=(1, 3), num_classes=3, head="mlp",
                             generator=torch.Generator().manual_seed(0))
    wave = torch.randn(4, 1, 1, 4000)
    assert model(wave).shape == (4, 3)
    keys = model.trained_keys(1, False)
    assert not any("feature_extractor" in k for k in keys)
    assert {model.layer_of(k) for k in model.state_dict()} == {0, 1, 2, 3}
    data = ClientData(wave, torch.tensor([0, 1, 2, 0]))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    update = train_exit_client(client_id=0, model=model, global_state=start, data=data, depth=1,
                               settings=SETTINGS, generator=torch.Generator().manual_seed(0))
    assert sorted(update.state) == sorted(keys)
    frozen = [k for k in start if "feature_extractor" in k]
    assert frozen and all(torch.equal(model.state_dict()[k], start[k]) for k in frozen)


def test_exit_accuracies_cover_every_exit() -> None:
    scores = exit_accuracies(_model(), _data(), 5)
    assert sorted(scores) == [1, 2, 4] and all(0.0 <= v <= 1.0 for v in scores.values())


def test_a_backbone_missing_a_hook_cannot_be_built() -> None:
    from fedcore.earlyexit.models import ExitBackbone

    class NoPool(ExitBackbone):
        @property
        def layers(self) -> torch.nn.ModuleList:
            return torch.nn.ModuleList()

        def stem(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(TypeError, match="pool"):
        NoPool()
