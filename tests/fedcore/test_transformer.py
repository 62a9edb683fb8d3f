"""Transformer model: registry build, seeding, variable-length input, per-layer embeddings, training signal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedcore.config import ModelConfig
from fedcore.models import MODELS, AudioTransformer, build_model

INPUT_SHAPE = (1, 64, 101)
NUM_CLASSES = 10
WIDTH, DEPTH = 32, 2


def _build(seed: int = 0, **size: int) -> AudioTransformer:
    cfg = ModelConfig(name="transformer", **{"width": WIDTH, "depth": DEPTH, **size})
    model = build_model(cfg, NUM_CLASSES, INPUT_SHAPE, torch.Generator().manual_seed(seed))
    assert isinstance(model, AudioTransformer)
    return model


def _inputs(batch: int, frames: int = INPUT_SHAPE[2], seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, INPUT_SHAPE[1], frames, generator=torch.Generator().manual_seed(seed))


def test_transformer_is_registered_and_maps_batch_to_logits() -> None:
    assert "transformer" in MODELS.names()
    model = _build()
    logits = model(_inputs(3))
    assert logits.shape == (3, NUM_CLASSES) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_transformer_layout() -> None:
    model = _build()
    assert model.embed.in_features == 64 * 4 and model.embed.out_features == WIDTH
    assert model.position.shape == (1, 26, WIDTH)  # ceil(101 / 4) tokens
    assert len(model.blocks) == DEPTH
    assert all(isinstance(b, nn.TransformerEncoderLayer) and b.norm_first for b in model.blocks)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == WIDTH
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))


def test_transformer_same_seed_same_weights_different_seed_different() -> None:
    first, second, other = _build(seed=7).state_dict(), _build(seed=7).state_dict(), _build(seed=8).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["position"], other["position"])
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_transformer_shorter_input_uses_first_positions_and_longer_raises() -> None:
    model = _build()
    assert model(_inputs(2, frames=101 // 3)).shape == (2, NUM_CLASSES)  # 33 frames → 9 tokens, one padded
    assert model(_inputs(2, frames=1)).shape == (2, NUM_CLASSES)
    with pytest.raises(ValueError, match="1 <= frames <= 101"):
        model(_inputs(2, frames=102))
    with pytest.raises(ValueError, match="'log_mel' must be"):
        model(torch.randn(2, 1, 32, 101))


def test_transformer_end_padding_is_zero_frames() -> None:
    model = _build().eval()
    x = _inputs(2, frames=33)
    padded = torch.cat([x, torch.zeros(2, 1, 64, 3)], dim=3)  # 36 frames = 9 full tokens
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded), rtol=0, atol=0)


def test_transformer_layer_embeddings_one_per_layer_and_forward_uses_last() -> None:
    model = _build(depth=3)
    x = _inputs(4)
    embeddings = model.layer_embeddings(x)
    assert len(embeddings) == 3
    assert all(e.shape == (4, WIDTH) for e in embeddings)
    assert torch.equal(model(x), model.classifier(embeddings[-1]))


def test_transformer_gradients_reach_every_parameter() -> None:
    model = _build()
    nn.functional.cross_entropy(model(_inputs(4)), torch.tensor([0, 1, 2, 3])).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_transformer_identity_head_gives_embeddings() -> None:
    model = _build()
    x = _inputs(3)
    expected = model.layer_embeddings(x)[-1]
    model.classifier = nn.Identity()  # type: ignore[assignment]
    assert torch.equal(model(x), expected)
    assert expected.shape == (3, WIDTH)


@pytest.mark.parametrize(
    ("size", "match"),
    [({"width": 6, "heads": 4}, "'width' must be divisible by heads \\(4\\)"),
     ({"width": 8, "heads": 0}, "'heads' must be an int >= 1"),
     ({"width": 0}, "'width' must be an int >= 1"),
     ({"depth": 0}, "'depth' must be an int >= 1"),
     ({"patch_frames": 0}, "'patch_frames' must be an int >= 1")],
)
def test_transformer_bad_sizes_raise(size: dict[str, int], match: str) -> None:
    kwargs = {"num_classes": 3, "input_shape": (1, 8, 8), "width": 8, "depth": 1, **size}
    with pytest.raises(ValueError, match=match):
        AudioTransformer(**kwargs)  # type: ignore[arg-type]


def test_transformer_factory_rejects_bad_config_and_picks_dividing_heads() -> None:
    with pytest.raises(ValueError, match="transformer: 'width' and 'depth' must be ints >= 1"):
        MODELS.build("transformer", num_classes=3, input_shape=(1, 8, 8), cfg=ModelConfig(width=0, depth=1))
    for width, heads in [(32, 4), (6, 2), (3, 1)]:
        layer = _build(width=width, depth=1).blocks[0]
        assert isinstance(layer, nn.TransformerEncoderLayer) and layer.self_attn.num_heads == heads


def test_transformer_overfits_a_tiny_batch() -> None:
    model = build_model(ModelConfig(name="transformer", width=16, depth=1), 2, (1, 8, 12), torch.Generator())
    x = torch.randn(8, 1, 8, 12, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1] * 4)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 < losses[0]
