"""SSL losses on hand-checkable inputs: NT-Xent, Barlow Twins, BYOL and the ACOP clip-order mapping."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fedcore.ssl.losses import (
    barlow_twins_loss,
    byol_loss,
    nt_xent,
    permutations,
    shuffle_clips,
    split_clips,
    unshuffle_clips,
)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# NT-Xent


def _nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """Eq. 1 of SimCLR written out anchor by anchor."""
    views = [v / v.norm() for v in [*z1, *z2]]
    n = len(z1)
    total = 0.0
    for i, anchor in enumerate(views):
        positive = i + n if i < n else i - n
        sims = [float(anchor @ other) / temperature for other in views]
        denominator = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(sims[positive]) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_nt_xent_identical_orthogonal_views_match_closed_form(n: int, temperature: float) -> None:
    z = torch.eye(n, n + 3, dtype=torch.float64)  # mutually orthogonal unit rows
    # anchor i: its copy has cos 1, every other of the 2N - 2 candidates (self excluded) has cos 0
    expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + 2 * n - 2))
    assert nt_xent(z, z.clone(), temperature).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("n", "d", "temperature"), [(2, 3, 0.5), (5, 7, 0.1), (9, 4, 1.3)])
def test_nt_xent_matches_loop_reference(n: int, d: int, temperature: float) -> None:
    z1, z2 = _randn(n, d, seed=1), _randn(n, d, seed=2)
    assert nt_xent(z1, z2, temperature).item() == pytest.approx(_nt_xent_loop(z1, z2, temperature), rel=1e-6)


def test_nt_xent_decreases_as_views_align() -> None:
    z1, noise = _randn(8, 16, seed=3), _randn(8, 16, seed=4)
    losses = [nt_xent(z1, z1 + scale * noise, 0.5).item() for scale in (4.0, 1.0, 0.25, 0.0)]
    assert losses == sorted(losses, reverse=True) and losses[0] > losses[-1] + 0.5


def test_nt_xent_symmetric_and_invariant_to_row_scale() -> None:
    z1, z2 = _randn(6, 5, seed=5), _randn(6, 5, seed=6)
    scale = torch.rand(6, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 10 + 0.1
    loss = nt_xent(z1, z2, 0.2)
    assert torch.allclose(loss, nt_xent(z2, z1, 0.2), rtol=1e-12)
    assert torch.allclose(loss, nt_xent(z1 * scale, z2 / scale, 0.2), rtol=1e-12)


def test_nt_xent_gradient_is_finite_despite_masked_diagonal() -> None:
    z1 = _randn(4, 3, seed=8).requires_grad_(True)
    z2 = _randn(4, 3, seed=9).requires_grad_(True)
    nt_xent(z1, z2, 0.1).backward()
    assert z1.grad is not None and z2.grad is not None
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all() and z1.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("z1", "z2", "temperature", "match"),
    [
        (torch.ones(4, 3), torch.ones(4, 2), 0.5, "'z1' and 'z2'"),
        (torch.ones(4), torch.ones(4), 0.5, "'z1' and 'z2'"),
        (torch.ones(1, 3), torch.ones(1, 3), 0.5, "'N'"),
        (torch.ones(4, 3), torch.ones(4, 3), 0.0, "'temperature'"),
        (torch.ones(4, 3), torch.ones(4, 3), float("inf"), "'temperature'"),
        (torch.ones(4, 3), torch.ones(4, 3), float("nan"), "'temperature'"),
    ],
)
def test_nt_xent_rejects_bad_input(z1: torch.Tensor, z2: torch.Tensor, temperature: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nt_xent(z1, z2, temperature)


# ---------------------------------------------------------------------------------------------------------------
# Barlow Twins


def _hadamard(order: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def _barlow_loop(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float) -> float:
    n, d = z1.shape

    def standardised(z: torch.Tensor, j: int) -> list[float]:
        column = [float(z[b, j]) for b in range(n)]
        mean = sum(column) / n
        var = sum((v - mean) ** 2 for v in column) / n
        return [(v - mean) / math.sqrt(var + eps) for v in column]

    a = [standardised(z1, j) for j in range(d)]
    b = [standardised(z2, j) for j in range(d)]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][k] * b[j][k] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return loss


def test_barlow_twins_decorrelated_batch_has_zero_loss() -> None:
    columns = _hadamard(8)[:, 1:]  # ±1 columns with zero mean, biased variance 1 and mutually orthogonal
    z = columns * torch.linspace(0.5, 3.0, 7, dtype=torch.float64) + torch.arange(7, dtype=torch.float64)
    assert barlow_twins_loss(z, z.clone(), lambd=1.0).item() < 1e-4
    assert barlow_twins_loss(z, z.clone(), lambd=1.0, eps=0.0).item() == pytest.approx(0.0, abs=1e-20)
    # unit-variance columns: C = I / (1 + eps) exactly, so the loss is d (eps / (1 + eps))^2 whatever λ
    shifted = columns - 2.0
    expected = 7 * (1e-2 / 1.01) ** 2
    assert barlow_twins_loss(shifted, shifted, lambd=5.0, eps=1e-2).item() == pytest.approx(expected, rel=1e-9)


def test_barlow_twins_hand_computed_correlation() -> None:
    x = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)  # zero mean, biased variance 1
    w = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)  # idem, orthogonal to x
    y = 0.5 * x + math.sqrt(0.75) * w  # zero mean, variance 1, correlation 0.5 with x
    both = torch.stack([x, y], dim=1)
    # z1 = z2 = [x, y]: C = [[1, .5], [.5, 1]], loss = λ (0.5^2 + 0.5^2)
    assert barlow_twins_loss(both, both, lambd=2.0, eps=0.0).item() == pytest.approx(2.0 * 0.5, rel=1e-12)
    # one dimension, views x and y: C = [[0.5]], loss = (1 - 0.5)^2
    assert barlow_twins_loss(x[:, None], y[:, None], lambd=9.0, eps=0.0).item() == pytest.approx(0.25, rel=1e-12)


def test_barlow_twins_lambda_scales_only_the_off_diagonal_term() -> None:
    z1, z2 = _randn(10, 4, seed=10), _randn(10, 4, seed=11)
    on = barlow_twins_loss(z1, z2, lambd=0.0)
    off = barlow_twins_loss(z1, z2, lambd=1.0) - on
    assert on > 0 and off > 0
    assert torch.allclose(barlow_twins_loss(z1, z2, lambd=3.0), on + 3.0 * off, rtol=1e-12)


@pytest.mark.parametrize(("n", "d", "lambd", "eps"), [(2, 2, 0.5, 1e-5), (7, 5, 5e-3, 1e-5), (12, 3, 1.0, 0.1)])
def test_barlow_twins_matches_loop_reference(n: int, d: int, lambd: float, eps: float) -> None:
    z1, z2 = _randn(n, d, seed=12), _randn(n, d, seed=13)
    loss = barlow_twins_loss(z1, z2, lambd=lambd, eps=eps).item()
    assert loss == pytest.approx(_barlow_loop(z1, z2, lambd, eps), rel=1e-6)


@pytest.mark.parametrize(
    ("z1", "lambd", "eps", "match"),
    [
        (torch.ones(1, 3), 1.0, 1e-5, "'N'"),
        (torch.ones(4, 3), -0.1, 1e-5, "'lambd'"),
        (torch.ones(4, 3), float("nan"), 1e-5, "'lambd'"),
        (torch.ones(4, 3), 1.0, -1.0, "'eps'"),
    ],
)
def test_barlow_twins_rejects_bad_input(z1: torch.Tensor, lambd: float, eps: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        barlow_twins_loss(z1, z1, lambd=lambd, eps=eps)
    with pytest.raises(ValueError, match="'z1' and 'z2'"):
        barlow_twins_loss(torch.ones(4, 3), torch.ones(3, 3), lambd=1.0)


# ---------------------------------------------------------------------------------------------------------------
# BYOL


def test_byol_loss_identical_opposite_orthogonal() -> None:
    z = torch.tensor([[1.0, 2.0, 2.0], [0.0, -3.0, 4.0]])
    orthogonal = torch.tensor([[2.0, -1.0, 0.0], [5.0, 0.0, 0.0]])
    assert byol_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(3.0 * z, z).item() == pytest.approx(0.0, abs=1e-6)  # scale free
    assert byol_loss(-z, z).item() == pytest.approx(4.0, abs=1e-6)
    assert byol_loss(orthogonal, z).item() == pytest.approx(2.0, abs=1e-6)
    # mean over the batch: rows aligned (0) and opposite (4)
    assert byol_loss(torch.stack([z[0], -z[1]]), z).item() == pytest.approx(2.0, abs=1e-6)


def test_byol_loss_stops_gradient_into_target() -> None:
    p = _randn(5, 4, seed=14).requires_grad_(True)
    z = _randn(5, 4, seed=15).requires_grad_(True)
    loss = byol_loss(p, z)
    loss.backward()
    assert z.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_byol_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="'p' and 'z'"):
        byol_loss(torch.ones(3, 4), torch.ones(3, 5))


# ---------------------------------------------------------------------------------------------------------------
# ACOP


def _labelled_clips(batch: int, n: int) -> torch.Tensor:
    """Clips (batch, n, 1, 2, 3) whose every entry of clip i of example b is 10 b + i."""
    values = 10 * torch.arange(batch)[:, None] + torch.arange(n)
    return values[:, :, None, None, None].expand(batch, n, 1, 2, 3).float()


def test_permutations_are_lexicographic() -> None:
    assert permutations(3) == [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    for n in range(2, 7):
        orders = permutations(n)
        assert len(orders) == len(set(orders)) == math.factorial(n)
        assert orders == sorted(orders) and orders == list(itertools.permutations(range(n)))


@pytest.mark.parametrize("n", [1, 7, 0, 2.0, True])
def test_permutations_reject_bad_count(n: int) -> None:
    with pytest.raises(ValueError, match="'n'"):
        permutations(n)


def test_split_clips_keeps_order_and_drops_remainder() -> None:
    x = torch.arange(2 * 1 * 3 * 11, dtype=torch.float32).reshape(2, 1, 3, 11)
    clips = split_clips(x, 3)
    assert clips.shape == (2, 3, 1, 3, 3)
    for i in range(3):
        assert torch.equal(clips[:, i], x[..., 3 * i : 3 * i + 3])
    assert not torch.isin(x[..., 9:], clips).any()  # frames 9 and 10 (11 mod 3) dropped


@pytest.mark.parametrize(("shape", "n", "match"), [((2, 1, 3, 2), 3, "'T // n'"), ((2, 3, 9), 3, "'x'")])
def test_split_clips_rejects_bad_input(shape: tuple[int, ...], n: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_clips(torch.zeros(shape), n)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_shuffle_clips_maps_every_label_to_its_permutation(n: int) -> None:
    batch = 30 * math.factorial(n)
    clips = _labelled_clips(batch, n)
    shuffled, labels = shuffle_clips(clips, torch.Generator().manual_seed(n))
    assert labels.dtype == torch.int64 and labels.shape == (batch,)
    assert set(labels.tolist()) == set(range(math.factorial(n)))  # every class drawn, so every class checked
    orders = permutations(n)
    for b in range(batch):
        order = orders[int(labels[b])]
        assert shuffled[b, :, 0, 0, 0].tolist() == [10 * b + i for i in order]
        for i in range(n):
            assert torch.equal(shuffled[b, i], clips[b, order[i]])
    assert torch.equal(unshuffle_clips(shuffled, labels), clips)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_unshuffle_inverts_every_order(n: int) -> None:
    classes = math.factorial(n)
    clips = _labelled_clips(classes, n)
    labels = torch.arange(classes)
    shuffled = torch.stack([clips[k, list(order)] for k, order in enumerate(permutations(n))])
    assert torch.equal(unshuffle_clips(shuffled, labels), clips)


def test_shuffle_clips_deterministic_per_generator_and_leaves_global_rng() -> None:
    clips = _randn(64, 3, 1, 4, 5, dtype=torch.float32)
    before = torch.random.get_rng_state()
    first = shuffle_clips(clips, torch.Generator().manual_seed(0))
    second = shuffle_clips(clips, torch.Generator().manual_seed(0))
    other = shuffle_clips(clips, torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def test_shuffle_clips_labels_are_uniform() -> None:
    _, labels = shuffle_clips(torch.zeros(6000, 3, 1), torch.Generator().manual_seed(2))
    counts = torch.bincount(labels, minlength=6)
    assert counts.shape == (6,) and (counts > 850).all() and (counts < 1150).all()  # 1000 ± ~5 sd


def test_clip_order_functions_reject_bad_input() -> None:
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="'n'"):
        shuffle_clips(torch.zeros(2, 7, 3), generator)
    with pytest.raises(ValueError, match="'n'"):
        shuffle_clips(torch.zeros(2, 1, 3), generator)
    with pytest.raises(ValueError, match="'labels'"):
        unshuffle_clips(torch.zeros(2, 3, 4), torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="'labels'"):
        unshuffle_clips(torch.zeros(2, 3, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="'labels'"):
        unshuffle_clips(torch.zeros(2, 3, 4), torch.tensor([0.0, 1.0]))
