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


def _model(depth: int = 4, exits: tuple[int, ...] = (1, 2, 4), seed: int = 0,
           exit_norm: str = "per_exit") -> EarlyExitModel:
    return build_exit_model("logmel_transformer", input_shape=SHAPE, cfg=ModelConfig(name="transformer", width=8,
                            depth=depth), options={}, exits=exits, num_classes=3, head="linear",
                            generator=torch.Generator().manual_seed(seed), exit_norm=exit_norm)


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


@pytest.mark.parametrize("exit_norm", ["per_exit", "shared"])
def test_trained_keys_stop_at_the_exit_and_take_its_head_or_all_heads_below(exit_norm: str) -> None:
    model = _model(exit_norm=exit_norm)
    keys = model.trained_keys(2, deep_supervision=False)
    assert max(model.layer_of(k) for k in keys) == 2
    assert {k.split(".")[1] for k in keys if k.startswith("heads.")} == {"2"}
    deep = model.trained_keys(2, deep_supervision=True)
    assert {k.split(".")[1] for k in deep if k.startswith("heads.")} == {"1", "2"}
    exit_parts = {k for k in model.state_dict() if model.exit_of(k)}  # heads (and per-exit norms)
    assert set(model.trained_keys(4, False)) | exit_parts == set(model.state_dict())


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


# ------------------------------------------------------------------------------------------------ exit norms
def _exit_norm_keys(keys: object) -> set[str]:
    """The exits whose own norm is among ``keys``, and the shared final norm as "shared"."""
    out = set()
    for key in keys:  # type: ignore[attr-defined]
        if key.startswith("exit_norms."):
            out.add(key.split(".")[1])
        elif key.startswith("backbone.net.norm."):
            out.add("shared")
    return out


@pytest.mark.parametrize(("exit_norm", "depth", "deep", "norms"), [
    ("per_exit", 2, False, {"2"}),
    ("per_exit", 4, False, {"4"}),          # passes exit 2 without supervising it: neither trains nor sends it
    ("per_exit", 4, True, {"2", "4"}),
    ("per_exit", 6, True, {"2", "4", "6"}),
    ("shared", 2, False, {"shared"}),       # the one final norm: every client, whatever its depth
    ("shared", 6, True, {"shared"}),
])
def test_each_exit_norm_is_trained_and_sent_only_by_the_clients_that_train_its_exit(
        exit_norm: str, depth: int, deep: bool, norms: set[str]) -> None:
    model = _model(depth=6, exits=(2, 4, 6), exit_norm=exit_norm)
    keys = model.trained_keys(depth, deep)
    assert _exit_norm_keys(keys) == norms
    heads = {k.split(".")[1] for k in keys if k.startswith("heads.")}
    if exit_norm == "per_exit":
        assert heads == norms  # the norm travels with its head
        assert not any(k.startswith("backbone.net.norm.") for k in model.state_dict())  # no shared norm left
    else:
        assert not any(k.startswith("exit_norms.") for k in model.state_dict())
    session = ExitDepth(depth, deep).start(model)
    try:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(keys)
    finally:
        session.finish()


@pytest.mark.parametrize("exit_norm", ["per_exit", "shared"])
def test_a_depth_2_client_sends_its_exit_norm_and_leaves_deeper_exit_norms_alone(exit_norm: str) -> None:
    model = _model(depth=6, exits=(2, 4, 6), exit_norm=exit_norm)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    update = train_exit_client(client_id=0, model=model, global_state=start, data=_data(), depth=2,
                               settings=SETTINGS, generator=torch.Generator().manual_seed(1))
    sent = set(update.state)
    after = model.state_dict()
    if exit_norm == "per_exit":
        assert {"exit_norms.2.weight", "exit_norms.2.bias"} <= sent
        assert not any(k.startswith(("exit_norms.4.", "exit_norms.6.", "backbone.net.norm.")) for k in sent)
        assert not torch.equal(update.state["exit_norms.2.weight"], start["exit_norms.2.weight"])  # trained
        assert all(torch.equal(after[k], start[k]) for k in start if k.startswith(("exit_norms.4.", "exit_norms.6.")))
    else:
        assert {"backbone.net.norm.weight", "backbone.net.norm.bias"} <= sent
        assert not torch.equal(update.state["backbone.net.norm.weight"], start["backbone.net.norm.weight"])


def test_per_exit_norms_start_as_the_shared_model_with_random_weights() -> None:
    per_exit, shared = _model(exit_norm="per_exit", seed=4), _model(exit_norm="shared", seed=4)
    own, common = per_exit.state_dict(), shared.state_dict()
    assert set(own) - set(common) == {f"exit_norms.{e}.{p}" for e in (1, 2, 4) for p in ("weight", "bias")}
    assert set(common) - set(own) == {"backbone.net.norm.weight", "backbone.net.norm.bias"}
    assert all(torch.equal(own[k], common[k]) for k in set(own) & set(common))  # no extra random draw
    x = _data(4).features
    with torch.no_grad():
        a, b = per_exit.exit_logits(x, 4), shared.exit_logits(x, 4)
    assert all(torch.equal(a[e], b[e]) for e in (1, 2, 4))


def _pretrained(width: int = 8, depth: int = 4) -> dict[str, torch.Tensor]:
    """A FASSL-like checkpoint ("backbone.*" of the log-mel transformer) whose final norm is not the default."""
    from fedcore.models.transformer import AudioTransformer

    g = torch.Generator().manual_seed(9)
    net = AudioTransformer(num_classes=1, input_shape=SHAPE, width=width, depth=depth, heads=4)
    state = {f"backbone.{k}": v.detach().clone() for k, v in net.state_dict().items() if "classifier" not in k}
    state["backbone.norm.weight"] = 1.0 + torch.rand(width, generator=g)
    state["backbone.norm.bias"] = torch.randn(width, generator=g)
    return state


def test_per_exit_norms_start_from_a_pretrained_final_norm_and_compute_what_shared_computes() -> None:
    state = _pretrained()
    per_exit, shared = _model(exit_norm="per_exit"), _model(exit_norm="shared")
    assert per_exit.load_pretrained(state) == []
    assert shared.load_pretrained(state) == []
    for exit_ in ("1", "2", "4"):
        assert torch.equal(per_exit.exit_norms[exit_].weight, state["backbone.norm.weight"])
        assert torch.equal(per_exit.exit_norms[exit_].bias, state["backbone.norm.bias"])
    per_exit.heads.load_state_dict(shared.heads.state_dict())
    x = _data(4).features
    with torch.no_grad():
        a, b = per_exit.exit_logits(x, 4), shared.exit_logits(x, 4)
    assert all(torch.allclose(a[e], b[e]) for e in (1, 2, 4))


def test_a_checkpoint_without_a_final_norm_leaves_the_exit_norms_at_the_default_and_says_so() -> None:
    state = {k: v for k, v in _pretrained().items() if not k.startswith("backbone.norm.")}
    model = _model()
    left = model.load_pretrained(state)
    assert left == [f"exit_norms.{e}.{p}" for e in (1, 2, 4) for p in ("weight", "bias")]
    assert all(torch.equal(n.weight, torch.ones(8)) and torch.equal(n.bias, torch.zeros(8))
               for n in model.exit_norms.values())
    bad = {**state, "backbone.norm.weight": torch.ones(5), "backbone.norm.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"final norm 'norm' must hold 'weight' and 'bias' of shape \(8,\)"):
        _model().load_pretrained(bad)
    with pytest.raises(ValueError, match="final norm"):
        _model().load_pretrained({**state, "backbone.norm.weight": torch.ones(8)})  # no bias


def test_a_wav2vec2_backbone_gets_a_norm_per_exit_only_under_per_exit() -> None:
    def build(exit_norm: str, **options: object) -> EarlyExitModel:
        return build_exit_model("wav2vec2", input_shape=(1, 1, 4000), cfg=ModelConfig(name="transformer", width=16,
                                depth=3), options={**TINY_W2V, **options}, exits=(1, 3), num_classes=3,
                                head="linear", generator=torch.Generator().manual_seed(0), exit_norm=exit_norm)

    shared, per_exit = build("shared"), build("per_exit")
    assert set(per_exit.state_dict()) - set(shared.state_dict()) == {
        f"exit_norms.{e}.{p}" for e in (1, 3) for p in ("weight", "bias")}
    assert set(shared.state_dict()) <= set(per_exit.state_dict())
    assert _exit_norm_keys(per_exit.trained_keys(1, False)) == {"1"}
    # pre-norm (layer_norm_first): the pretrained encoder's final layer_norm starts every exit norm
    pre_norm = build("per_exit", layer_norm_first=True)
    state = {k[len("model."):]: v.clone() for k, v in pre_norm.backbone.state_dict().items()}
    state["encoder.transformer.layer_norm.weight"] = torch.full((16,), 2.0)
    assert pre_norm.load_pretrained(state) == []
    assert all(torch.equal(n.weight, torch.full((16,), 2.0)) for n in pre_norm.exit_norms.values())
    # post-norm: that norm precedes the layers, so the exit norms stay at the default
    left = per_exit.load_pretrained({k: v for k, v in state.items() if "pos_conv" not in k})
    assert [k for k in left if k.startswith("exit_norms.")] == [
        f"exit_norms.{e}.{p}" for e in (1, 3) for p in ("weight", "bias")]


def test_an_unknown_exit_norm_is_refused() -> None:
    with pytest.raises(ValueError, match="EarlyExitModel: 'exit_norm' must be one of per_exit, shared. Got 'layer'"):
        _model(exit_norm="layer")
