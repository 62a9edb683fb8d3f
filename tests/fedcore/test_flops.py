from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedcore.earlyexit.flops import FlopCount, count_flops, training_step_flops

B, IN, HID, OUT = 3, 5, 7, 4


def test_flop_count_arithmetic() -> None:
    a, b = FlopCount(forward=10, backward=20), FlopCount(forward=1, backward=2)
    assert a.total == 30
    assert a + b == FlopCount(forward=11, backward=22)
    assert a.times(3) == FlopCount(forward=30, backward=60)
    assert a.times(0) == FlopCount(forward=0, backward=0)


@pytest.mark.parametrize("forward, backward", [(-1, 0), (0, -1), (1.5, 0), (True, 0)])
def test_flop_count_rejects_bad_counts(forward: object, backward: object) -> None:
    with pytest.raises(ValueError, match="FlopCount"):
        FlopCount(forward=forward, backward=backward)  # type: ignore[arg-type]


def test_flop_count_times_rejects_negative() -> None:
    with pytest.raises(ValueError, match="'k'"):
        FlopCount(forward=1, backward=1).times(-1)


@pytest.mark.parametrize("input_grad", [False, True])
def test_linear_forward_and_backward(input_grad: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(IN, OUT)
    x = torch.randn(B, IN, requires_grad=input_grad)
    count = count_flops(lambda: layer(x).sum())
    mac = B * IN * OUT
    assert count.forward == 2 * mac
    # backward: weight gradient always, input gradient only when x requires grad (bias gradient is a sum, uncounted)
    assert count.backward == (4 * mac if input_grad else 2 * mac)
    assert count.total == count.forward + count.backward


def test_forward_only_counts_no_backward() -> None:
    layer = nn.Linear(IN, OUT)
    x = torch.randn(B, IN)
    assert count_flops(lambda: layer(x).sum(), backward=False) == FlopCount(forward=2 * B * IN * OUT, backward=0)
    assert layer.weight.grad is None


def _encoder_flops(batch: int, tokens: int, d: int, heads: int, ff: int) -> tuple[int, int]:
    """Analytic (forward, backward) FLOPs of one pre-norm encoder layer, 2 FLOPs per multiply-add."""
    head_dim = d // heads
    in_proj = 2 * batch * tokens * d * (3 * d)
    scores = 2 * batch * heads * tokens * tokens * head_dim
    weighted_values = 2 * batch * heads * tokens * tokens * head_dim
    out_proj = 2 * batch * tokens * d * d
    mlp = 2 * batch * tokens * d * ff + 2 * batch * tokens * ff * d
    linear = in_proj + out_proj + mlp
    forward = linear + scores + weighted_values
    # every linear layer's input depends on a trainable LayerNorm, so backward = weight + input grad = 2× forward;
    # fused attention backward: 5 products of the scores' size (scores recomputed, dP, dV, dQ, dK)
    backward = 2 * linear + 5 * scores
    return forward, backward


# Train mode with grad, and eval mode under no_grad: without count_flops' fixes, the first misses attention
# scores/values (CPU SDPA kernel has no formula in torch's registry) and the second counts 0 (fused fast path).
@pytest.mark.parametrize("train", [True, False])
def test_transformer_encoder_layer_matches_analytic(train: bool) -> None:
    torch.manual_seed(0)
    batch, tokens, d, heads, ff = 2, 6, 8, 2, 12
    layer = nn.TransformerEncoderLayer(d_model=d, nhead=heads, dim_feedforward=ff, dropout=0.0, batch_first=True,
                                       norm_first=True)
    layer.train(train)
    x = torch.randn(batch, tokens, d)
    forward, backward = _encoder_flops(batch, tokens, d, heads, ff)
    if train:
        assert count_flops(lambda: layer(x).sum()) == FlopCount(forward=forward, backward=backward)
    else:
        with torch.no_grad():
            assert count_flops(lambda: layer(x).sum(), backward=False) == FlopCount(forward=forward, backward=0)
    assert torch.backends.mha.get_fastpath_enabled()


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT))


def test_training_step_flops_mlp() -> None:
    torch.manual_seed(0)
    model = _mlp()
    model.eval()
    x, y = torch.randn(B, IN), torch.randint(0, OUT, (B,))
    count = training_step_flops(model, x, lambda out: F.cross_entropy(out, y))
    assert count.forward == 2 * B * IN * HID + 2 * B * HID * OUT
    # first layer: weight grad only (raw inputs need none); second layer: weight and input grad
    assert count.backward == 2 * B * IN * HID + 4 * B * HID * OUT
    assert count.total == count.forward + count.backward
    assert all(p.grad is None for p in model.parameters())
    assert not any(m.training for m in model.modules())


def test_training_step_flops_restores_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HID), nn.BatchNorm1d(HID), nn.Dropout(0.5), nn.Linear(HID, OUT))
    model.train()
    model[1].eval()  # mixed modes must come back as they were, not as model.train(flag)
    existing = torch.ones_like(model[0].weight)
    model[0].weight.grad = existing
    buffers = [b.clone() for b in model.buffers()]
    x = torch.randn(B, IN)
    rng = torch.get_rng_state()
    count = training_step_flops(model, x, lambda out: out.square().mean())
    assert count.forward == 2 * B * IN * HID + 2 * B * HID * OUT
    assert [m.training for m in model] == [True, False, True, True]
    assert model.training
    assert model[0].weight.grad is existing and torch.equal(existing, torch.ones_like(existing))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.weight")
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), buffers, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)


def test_frozen_first_layer_saves_exact_backward() -> None:
    torch.manual_seed(0)
    hid2 = 6
    trainable = nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, hid2), nn.ReLU(), nn.Linear(hid2, OUT))
    frozen = nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, hid2), nn.ReLU(), nn.Linear(hid2, OUT))
    frozen[0].requires_grad_(False)
    x = torch.randn(B, IN)

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        return out.square().mean()

    full = training_step_flops(trainable, x, loss_fn)
    partial = training_step_flops(frozen, x, loss_fn)
    assert partial.forward == full.forward
    # frozen layer 0 loses its weight grad; layer 2's input no longer needs a gradient, so it loses its input grad
    assert full.backward - partial.backward == 2 * B * IN * HID + 2 * B * HID * hid2
    assert partial.backward == 2 * B * HID * hid2 + 4 * B * hid2 * OUT


def test_count_flops_rejects_bad_arguments() -> None:
    layer = nn.Linear(IN, OUT)
    x = torch.randn(B, IN)
    with pytest.raises(TypeError, match="'step' must be callable"):
        count_flops(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must return a tensor"):
        count_flops(lambda: 1.0)  # type: ignore[arg-type, return-value]
    with pytest.raises(ValueError, match="scalar tensor that requires grad"):
        count_flops(lambda: layer(x))
    with torch.no_grad(), pytest.raises(ValueError, match="requires grad"):
        count_flops(lambda: layer(x).sum())


def test_training_step_flops_rejects_bad_arguments() -> None:
    model = _mlp()
    x = torch.randn(B, IN)
    with pytest.raises(TypeError, match="'model'"):
        training_step_flops(object(), x, torch.sum)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'inputs'"):
        training_step_flops(model, [1.0], torch.sum)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'loss_fn'"):
        training_step_flops(model, x, None)  # type: ignore[arg-type]
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        training_step_flops(model, x, torch.sum)
    assert all(p.grad is None for p in model.parameters())
