"""Every registered aggregation rule: shared properties, naive-loop oracles, limit cases, robustness and screening."""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Sequence
from typing import Any

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from fedcore.aggregation import AGGREGATORS, Aggregate, Aggregator, ClientUpdate, FedAvg, StateDict, clone_state
from fedcore.errors import AggregationError, QuorumError

ALL_RULES = (
    "fairavg", "fedadam", "fedavg", "fedyogi", "krum", "ldawa", "loss", "lpa", "median", "multikrum", "trimmed_mean",
)
FLOAT_KEYS = ("conv.weight", "fc.bias")
INT_KEY = "bn.num_batches_tracked"
ROUND = 5  # past L-DAWA's two warm-up rounds
TOL = 1e-12

# Rules whose result is a convex combination of the client values (coordinate-wise).
CONVEX = ("fairavg", "fedavg", "krum", "loss", "lpa", "median", "multikrum", "trimmed_mean")
# (name, options) of the rules that weight by n_k, and of the rules that ignore the counts.
COUNT_WEIGHTED = [("fedavg", {}), ("lpa", {}), ("fedadam", {}), ("fedyogi", {}), ("loss", {"loss_gamma": 0.3})]
COUNT_FREE = [("fairavg", {}), ("median", {}), ("trimmed_mean", {}), ("krum", {}), ("multikrum", {}), ("ldawa", {}),
              ("loss", {"loss_gamma": 0.0})]


def _state(gen: torch.Generator, *, base: StateDict | None = None, scale: float = 1.0, count: int = 100,
           float32: bool = False) -> StateDict:
    """A small state dict: two float64 entries, an int64 counter and optionally a float32 entry.

    With ``base``, the floating entries are ``base`` plus ``scale`` × standard normal noise.
    """
    shapes = {"conv.weight": (2, 3), "fc.bias": (3,)}
    if float32:
        shapes["fc.weight"] = (3, 2)
    state: StateDict = {}
    for key, shape in shapes.items():
        noise = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
        value = noise if base is None else base[key].to(torch.float64) + noise
        state[key] = value.to(torch.float32) if key == "fc.weight" else value
    state[INT_KEY] = torch.tensor(count, dtype=torch.int64)
    return state


def _round(seed: int, num_clients: int = 6, *, float32: bool = False, scale: float = 0.5
           ) -> tuple[StateDict, list[ClientUpdate]]:
    """Global state and ``num_clients`` updates near it; ids 2, 5, 8, ...; unequal counts and losses."""
    gen = torch.Generator().manual_seed(seed)
    glob = _state(gen, count=100, float32=float32)
    updates = []
    for k in range(num_clients):
        count = 100 + int(torch.randint(0, 40, (1,), generator=gen))
        state = _state(gen, base=glob, scale=scale, count=count, float32=float32)
        num_examples = int(torch.randint(1, 500, (1,), generator=gen))
        loss = 3.0 * float(torch.rand(1, generator=gen))
        updates.append(ClientUpdate(3 * k + 2, state, num_examples, {"train_loss": loss}))
    return glob, updates


def _build(name: str, **options: Any) -> Aggregator:
    return AGGREGATORS.build(name, **options)


def _run(name: str, glob: StateDict, updates: Sequence[ClientUpdate], server_round: int = ROUND,
         **options: Any) -> Aggregate:
    """Aggregate with a fresh aggregator (FedAdam/FedYogi keep state between calls)."""
    return _build(name, **options).aggregate(glob, list(updates), server_round)


def _with_counts(updates: Sequence[ClientUpdate], counts: Sequence[int]) -> list[ClientUpdate]:
    return [ClientUpdate(u.client_id, u.state, n, u.metrics) for u, n in zip(updates, counts, strict=True)]


def _with_state(update: ClientUpdate, **entries: torch.Tensor | None) -> ClientUpdate:
    """``update`` with entries replaced (None deletes the key); dotted keys are passed as ``conv__weight``."""
    state = dict(update.state)
    for name, value in entries.items():
        key = name.replace("__", ".")
        if value is None:
            del state[key]
        else:
            state[key] = value
    return ClientUpdate(update.client_id, state, update.num_examples, update.metrics)


def _assert_states_equal(a: StateDict, b: StateDict, keys: Sequence[str] | None = None) -> None:
    for key in a if keys is None else keys:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), (key, a[key], b[key])


def _assert_states_close(a: StateDict, b: StateDict, tol: float = TOL, keys: Sequence[str] | None = None) -> None:
    for key in a if keys is None else keys:
        assert a[key].dtype == b[key].dtype, key
        assert torch.allclose(a[key], b[key], rtol=tol, atol=tol), (key, a[key], b[key])


def _flat(tensor: torch.Tensor) -> list[float]:
    return [float(x) for x in tensor.flatten().tolist()]


def _approx(values: list[float], tol: float = TOL) -> Any:
    return pytest.approx(values, rel=tol, abs=tol)


# ------------------------------------------------------------------------------------------------ naive oracles
# Plain Python lists and loops over coordinates: no vectorised torch.
def _rows(updates: Sequence[ClientUpdate], key: str) -> list[list[float]]:
    """The flattened values of ``key``, one list per client, clients in increasing id order."""
    return [_flat(u.state[key]) for u in sorted(updates, key=lambda u: u.client_id)]


def _naive_weighted(updates: Sequence[ClientUpdate], weights: dict[int, float], key: str) -> list[float]:
    ordered = sorted(updates, key=lambda u: u.client_id)
    rows = _rows(ordered, key)
    out = []
    for i in range(len(rows[0])):
        total = 0.0
        for update, row in zip(ordered, rows, strict=True):
            total += weights[update.client_id] * row[i]
        out.append(total)
    return out


def _counts(updates: Sequence[ClientUpdate]) -> dict[int, float]:
    total = sum(u.num_examples for u in updates)
    return {u.client_id: u.num_examples / total for u in updates}


def _uniform(updates: Sequence[ClientUpdate]) -> dict[int, float]:
    return {u.client_id: 1.0 / len(updates) for u in updates}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    size = len(ordered)
    if size % 2 == 1:
        return ordered[size // 2]
    return (ordered[size // 2 - 1] + ordered[size // 2]) / 2


def _naive_trimmed(updates: Sequence[ClientUpdate], key: str, beta: float) -> list[float]:
    rows = _rows(updates, key)
    cut = math.floor(beta * len(rows))
    out = []
    for i in range(len(rows[0])):
        kept = sorted(row[i] for row in rows)[cut:len(rows) - cut]
        out.append(sum(kept) / len(kept))
    return out


def _naive_krum_scores(updates: Sequence[ClientUpdate], keys: Sequence[str], f: int) -> dict[int, float]:
    ordered = sorted(updates, key=lambda u: u.client_id)
    vectors = [[x for key in keys for x in _flat(u.state[key])] for u in ordered]
    scores = {}
    for a, update in enumerate(ordered):
        distances = []
        for b in range(len(ordered)):
            if b != a:
                distances.append(sum((x - y) ** 2 for x, y in zip(vectors[a], vectors[b], strict=True)))
        scores[update.client_id] = sum(sorted(distances)[:len(ordered) - f - 2])
    return scores


def _naive_lpa(updates: Sequence[ClientUpdate], key: str, *, rule: str = "mad", kappa: float = 2.5,
               fraction: float = 0.2) -> tuple[list[float], list[int]]:
    """(result, pruned client ids) of one layer."""
    ordered = sorted(updates, key=lambda u: u.client_id)
    rows = _rows(ordered, key)
    centre = [_median([row[i] for row in rows]) for i in range(len(rows[0]))]
    deviations = [math.sqrt(sum((x - c) ** 2 for x, c in zip(row, centre, strict=True))) for row in rows]
    if rule == "mad":
        med = _median(deviations)
        mad = _median([abs(d - med) for d in deviations])
        pruned = [u.client_id for u, d in zip(ordered, deviations, strict=True) if d > med + kappa * mad]
    else:
        count = math.floor(fraction * len(ordered))
        ranked = sorted(zip(deviations, [u.client_id for u in ordered], strict=True), reverse=True)
        pruned = sorted(client for _, client in ranked[:count])
    kept = [u for u in ordered if u.client_id not in pruned]
    total = sum(u.num_examples for u in kept)
    weights = {u.client_id: (u.num_examples / total if u in kept else 0.0) for u in ordered}
    return _naive_weighted(ordered, weights, key), pruned


def _naive_cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm_a = math.sqrt(sum(x * x for x in a))
    norm_b = math.sqrt(sum(y * y for y in b))
    return min(1.0, dot / (norm_a * norm_b))


def _naive_ldawa(glob: StateDict, updates: Sequence[ClientUpdate], key: str) -> tuple[list[float], dict[int, float]]:
    """(result, cosine per client) of one layer."""
    ordered = sorted(updates, key=lambda u: u.client_id)
    reference = _flat(glob[key])
    cosines = {u.client_id: _naive_cosine(_flat(u.state[key]), reference) for u in ordered}
    weights = {client: cos / len(ordered) for client, cos in cosines.items()}
    return _naive_weighted(ordered, weights, key), cosines


def _naive_int_mean(updates: Sequence[ClientUpdate]) -> int:
    total = sum(u.num_examples for u in updates)
    mean = sum(u.num_examples * int(u.state[INT_KEY]) for u in updates) / total
    return round(mean)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_holds_every_rule() -> None:
    assert tuple(AGGREGATORS.names()) == ALL_RULES


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_count_weighted_attribute(name: str) -> None:
    expected = name in ("fedavg", "lpa", "fedadam", "fedyogi")
    assert type(_build(name)).count_weighted is expected


def test_loss_rule_requires_train_loss_metric() -> None:
    assert type(_build("loss")).required_metrics == ("train_loss",)
    assert all(type(_build(name)).required_metrics == () for name in ALL_RULES if name != "loss")


# --------------------------------------------------------------------------------------------- permutation invariance
@pytest.mark.parametrize("name", AGGREGATORS.names())
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_clients=st.integers(5, 7), shuffle=st.randoms(use_true_random=False))
def test_permutation_invariance(name: str, seed: int, num_clients: int, shuffle: random.Random) -> None:
    glob, updates = _round(seed, num_clients, float32=True)
    shuffled = list(updates)
    shuffle.shuffle(shuffled)
    a, b = _run(name, glob, updates), _run(name, glob, shuffled)
    _assert_states_equal(a.state, b.state)
    assert a.flagged == b.flagged
    assert a.weights == b.weights
    assert a.excluded_per_layer == b.excluded_per_layer


# ------------------------------------------------------------------------------------------------ fixed points
@pytest.mark.parametrize("name", AGGREGATORS.names())
@pytest.mark.parametrize("seed", [0, 1])
def test_identical_updates_equal_to_global_are_a_fixed_point(name: str, seed: int) -> None:
    glob, updates = _round(seed, 6)
    same = [ClientUpdate(u.client_id, clone_state(glob), u.num_examples, u.metrics) for u in updates]
    result = _run(name, glob, same)
    _assert_states_close(result.state, glob)
    if name in ("fedavg", "fairavg", "ldawa", "lpa", "fedadam", "fedyogi"):  # rank-based rules break ties by id
        assert not result.flagged


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_identical_updates_away_from_global(name: str) -> None:
    glob, updates = _round(3, 6)
    target = updates[0].state
    same = [ClientUpdate(u.client_id, clone_state(target), u.num_examples, u.metrics) for u in updates]
    result = _run(name, glob, same).state
    assert torch.equal(result[INT_KEY], target[INT_KEY])
    if name == "ldawa":  # every client scaled by the same per-layer cosine to the global state
        for key in FLOAT_KEYS:
            cosine = _naive_cosine(_flat(target[key]), _flat(glob[key]))
            assert cosine < 0.999
            assert _flat(result[key]) == _approx([cosine * x for x in _flat(target[key])])
    elif name in ("fedadam", "fedyogi"):  # one optimiser step from w_t towards the common state
        aggregator: Any = _build(name)
        bound = aggregator.server_lr * (1 - aggregator.server_beta1) / math.sqrt(1 - aggregator.server_beta2)
        for key in FLOAT_KEYS:
            step, gap = result[key] - glob[key], target[key] - glob[key]
            assert torch.equal(torch.sign(step), torch.sign(gap))
            assert (step.abs() <= bound + 1e-12).all()  # Adam's first step: at most η(1 − β₁)/√(1 − β₂)
    else:
        _assert_states_close(result, target)


# ------------------------------------------------------------------------------------------------ counts
@pytest.mark.parametrize(("name", "options"), COUNT_WEIGHTED, ids=[n for n, _ in COUNT_WEIGHTED])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_count_weighted_rules_are_invariant_to_scaling_every_count(name: str, options: dict, seed: int) -> None:
    glob, updates = _round(seed, 6)
    scaled = _with_counts(updates, [7 * u.num_examples for u in updates])
    a, b = _run(name, glob, updates, **options), _run(name, glob, scaled, **options)
    _assert_states_close(a.state, b.state)
    assert a.flagged == b.flagged
    # ... but the counts do matter: giving one client most of the data moves the result
    skewed = _with_counts(updates, [10_000 if i == 0 else 1 for i in range(len(updates))])
    c = _run(name, glob, skewed, **options)
    assert any(not torch.allclose(a.state[k], c.state[k], rtol=1e-6, atol=1e-6) for k in FLOAT_KEYS)


@pytest.mark.parametrize(("name", "options"), COUNT_FREE, ids=[f"{n}{o}" for n, o in COUNT_FREE])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_count_free_rules_ignore_the_counts(name: str, options: dict, seed: int) -> None:
    glob, updates = _round(seed, 6)
    gen = random.Random(seed)
    changed = _with_counts(updates, [gen.randint(1, 10_000) for _ in updates])
    a, b = _run(name, glob, updates, **options), _run(name, glob, changed, **options)
    _assert_states_equal(a.state, b.state, keys=FLOAT_KEYS)  # the integer entry is FedAvg's, so it may change
    assert a.weights == b.weights
    assert a.flagged == b.flagged


# ------------------------------------------------------------------------------------------------ convexity
@pytest.mark.parametrize("name", CONVEX)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_clients=st.integers(5, 7), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_convex_rules_stay_within_coordinatewise_min_max(
    name: str, seed: int, num_clients: int, scale: float
) -> None:
    glob, updates = _round(seed, num_clients, float32=True, scale=scale)
    result = _run(name, glob, updates).state
    for key in (*FLOAT_KEYS, "fc.weight"):
        values = torch.stack([u.state[key] for u in updates])
        low, high = values.min(dim=0).values, values.max(dim=0).values
        slack = 1e-12 * torch.maximum(low.abs(), high.abs()) if values.dtype == torch.float64 else 0.0
        assert (result[key] >= low - slack).all(), key
        assert (result[key] <= high + slack).all(), key


# ------------------------------------------------------------------------------------------------ oracles
@pytest.mark.parametrize("seed", [0, 1])
def test_fairavg_is_the_uniform_mean(seed: int) -> None:
    glob, updates = _round(seed, 6)
    result = _run("fairavg", glob, updates)
    for key in FLOAT_KEYS:
        assert _flat(result.state[key]) == _approx(_naive_weighted(updates, _uniform(updates), key))
    assert result.weights == pytest.approx(_uniform(updates))
    assert not result.flagged


def _with_losses(updates: Sequence[ClientUpdate], losses: Sequence[float]) -> list[ClientUpdate]:
    return [ClientUpdate(u.client_id, u.state, u.num_examples, {"train_loss": loss})
            for u, loss in zip(updates, losses, strict=True)]


def _loss_weights(updates: Sequence[ClientUpdate], scores: Sequence[float], gamma: float) -> dict[int, float]:
    """γ n_k/n + (1 − γ) s_k / Σ s_j, naively."""
    total, counts = sum(scores), _counts(updates)
    return {u.client_id: gamma * counts[u.client_id] + (1 - gamma) * s / total
            for u, s in zip(updates, scores, strict=True)}


@pytest.mark.parametrize("gamma", [0.0, 0.2, 1.0])
def test_raw_loss_rule_matches_exp_minus_loss_weights_mixed_with_fedavg(gamma: float) -> None:
    glob, updates = _round(4, 6)
    weights = _loss_weights(updates, [math.exp(-u.metrics["train_loss"]) for u in updates], gamma)
    result = _run("loss", glob, updates, loss_gamma=gamma, loss_scale="raw")
    for key in FLOAT_KEYS:
        assert _flat(result.state[key]) == _approx(_naive_weighted(updates, weights, key))
    assert result.weights == pytest.approx(weights, rel=TOL)
    flagged = {c for c, w in weights.items() if w < 0.5 / len(updates)}
    assert result.flagged == flagged


@pytest.mark.parametrize("gamma", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.05])
def test_relative_loss_rule_matches_exp_minus_gap_over_mean_mixed_with_fedavg(gamma: float,
                                                                              temperature: float) -> None:
    glob, updates = _round(4, 6)
    losses = [u.metrics["train_loss"] for u in updates]
    mean = sum(losses) / len(losses)  # the losses are >= 0: mean |L| = mean L
    scores = [math.exp(-(loss - min(losses)) / (temperature * mean)) for loss in losses]
    weights = _loss_weights(updates, scores, gamma)
    result = _run("loss", glob, updates, loss_gamma=gamma, loss_temperature=temperature)
    for key in FLOAT_KEYS:
        assert _flat(result.state[key]) == _approx(_naive_weighted(updates, weights, key))
    assert result.weights == pytest.approx(weights, rel=TOL)
    assert result.flagged == {c for c, w in weights.items() if w < 0.5 / len(updates)}
    if gamma == 1.0:  # pure FedAvg
        assert result.weights == pytest.approx(_counts(updates), rel=TOL)


def test_raw_loss_rule_reproduces_the_old_weights_exactly() -> None:
    # The rule before loss_scale existed: s_k = exp(−(L_k − min L)), weights γ n_k/n + (1 − γ) s_k / Σ s.
    glob, updates = _round(4, 6)
    for gamma in (0.0, 0.2):
        losses = [float(u.metrics["train_loss"]) for u in updates]
        lowest = min(losses)
        scores = [math.exp(-(loss - lowest)) for loss in losses]
        total = sum(scores)
        total_n = sum(u.num_examples for u in updates)
        old = {u.client_id: gamma * (u.num_examples / total_n) + (1.0 - gamma) * s / total
               for u, s in zip(updates, scores, strict=True)}
        assert _run("loss", glob, updates, loss_gamma=gamma, loss_scale="raw").weights == old  # bit for bit


@pytest.mark.parametrize(
    ("losses", "relative", "raw"),
    [
        # Barlow Twins' scale: m = 50.5; relative s = (1, e^(−0.5/50.5), e^(−1/50.5)); raw s = (1, e^(−0.5), e^(−1))
        ([50.0, 50.5, 51.0], [0.336639, 0.333322, 0.330039], [0.506480, 0.307196, 0.186324]),
        # ACOP's scale: m = 5.47/3; relative s = (1, e^(−0.02/m), e^(−0.05/m)); raw s = (1, e^(−0.02), e^(−0.05))
        ([1.80, 1.82, 1.85], [0.337605, 0.333922, 0.328473], [0.341131, 0.334376, 0.324494]),
    ],
)
def test_loss_rule_weights_by_hand(losses: list[float], relative: list[float], raw: list[float]) -> None:
    glob, updates = _round(4, 3)
    updates = _with_losses(updates, losses)
    mean = sum(losses) / 3
    for scale, gaps, expected in (("relative", [(x - losses[0]) / mean for x in losses], relative),
                                  ("raw", [x - losses[0] for x in losses], raw)):
        scores = [math.exp(-g) for g in gaps]
        by_hand = [s / sum(scores) for s in scores]
        assert by_hand == pytest.approx(expected, abs=1e-6)  # the table above
        weights = _run("loss", glob, updates, loss_scale=scale).weights
        assert [weights[u.client_id] for u in updates] == pytest.approx(by_hand, rel=TOL), scale


@pytest.mark.parametrize("factor", [30.0, 1e-3, 1e6])
def test_relative_loss_rule_is_scale_free_and_raw_is_not(factor: float) -> None:
    glob, updates = _round(4, 6)
    scaled = _with_losses(updates, [factor * u.metrics["train_loss"] for u in updates])
    for temperature in (1.0, 0.1):
        a = _run("loss", glob, updates, loss_temperature=temperature)
        b = _run("loss", glob, scaled, loss_temperature=temperature)
        assert b.weights == pytest.approx(dict(a.weights), rel=1e-12)
        _assert_states_close(a.state, b.state, tol=1e-12)
    a, b = _run("loss", glob, updates, loss_scale="raw"), _run("loss", glob, scaled, loss_scale="raw")
    assert max(abs(b.weights[c] - a.weights[c]) for c in a.weights) > 1e-3


def test_relative_loss_rule_is_the_raw_rule_on_losses_in_units_of_their_mean() -> None:
    glob, updates = _round(4, 6)
    mean = sum(u.metrics["train_loss"] for u in updates) / len(updates)
    rescaled = _with_losses(updates, [u.metrics["train_loss"] / mean for u in updates])
    relative = _run("loss", glob, updates, loss_temperature=0.3).weights
    raw = _run("loss", glob, rescaled, loss_scale="raw", loss_temperature=0.3).weights
    assert relative == pytest.approx(dict(raw), rel=1e-12)


def test_lower_loss_temperature_sharpens_the_weights() -> None:
    glob, updates = _round(4, 6)
    best = min(updates, key=lambda u: u.metrics["train_loss"]).client_id
    shares = [_run("loss", glob, updates, loss_temperature=t).weights[best] for t in (10.0, 1.0, 0.1, 0.01)]
    assert shares == sorted(shares) and shares[-1] > 0.9 and shares[0] < 1.0 / len(updates) + 0.05


@pytest.mark.parametrize("scale", ["relative", "raw"])
@pytest.mark.parametrize("loss", [0.0, 1.8, 50.0, -0.7])
def test_equal_losses_give_equal_weights(scale: str, loss: float) -> None:
    glob, updates = _round(4, 5)
    result = _run("loss", glob, _with_losses(updates, [loss] * 5), loss_scale=scale)
    assert result.weights == pytest.approx(_uniform(updates), rel=TOL)
    assert not result.flagged


@pytest.mark.parametrize(
    "losses",
    [
        [-1.0, -0.5, 0.2, 0.3, 1.0],          # mean loss 0: the mean |loss| is still > 0
        [-3.0, -2.0, -2.5, -2.9, -2.1],       # all negative
        [0.0, 0.0, 0.0, 0.0, 5e-324],         # subnormal gap
        [1e308, -1e308, 0.0, 1e308, 0.5],     # near overflow
        [0.0, 1e-300, 2e-300, 3e-300, 0.0],
    ],
)
def test_relative_loss_rule_is_defined_for_any_finite_losses(losses: list[float]) -> None:
    glob, updates = _round(4, 5)
    weights = _run("loss", glob, _with_losses(updates, losses)).weights
    assert all(math.isfinite(w) and w >= 0 for w in weights.values())
    assert sum(weights.values()) == pytest.approx(1.0, rel=1e-12)
    best = updates[losses.index(min(losses))].client_id
    assert weights[best] == max(weights.values())
    # still scale-free (a power of 2 that keeps every scaled loss finite and exact)
    factor = 0.25 if max(abs(x) for x in losses) > 1.0 else 4.0
    scaled = _run("loss", glob, _with_losses(updates, [x * factor for x in losses])).weights
    assert scaled == pytest.approx(dict(weights), rel=1e-9, abs=1e-300)


def test_loss_rule_refuses_non_finite_losses_when_called_directly() -> None:
    glob, updates = _round(4, 3)
    bad = _with_losses(updates, [1.0, math.nan, 2.0])
    with pytest.raises(AggregationError, match="finite"):
        _build("loss").combine(glob, bad, ROUND)


def test_loss_rule_differs_from_fedavg_and_fairavg() -> None:
    glob, updates = _round(4, 6)
    for scale in ("relative", "raw"):
        result = _run("loss", glob, updates, loss_scale=scale).state
        for other in ("fedavg", "fairavg"):
            assert not torch.allclose(result["conv.weight"], _run(other, glob, updates).state["conv.weight"])


@pytest.mark.parametrize("scale", ["relative", "raw"])
def test_loss_rule_does_not_underflow_for_large_losses(scale: str) -> None:
    glob, updates = _round(4, 6)
    # raw: a shift changes nothing; relative: a common factor changes nothing
    shifted = _with_losses(updates, [u.metrics["train_loss"] + 1000.0 if scale == "raw" else
                                     u.metrics["train_loss"] * 1e300 for u in updates])
    a, b = _run("loss", glob, updates, loss_scale=scale), _run("loss", glob, shifted, loss_scale=scale)
    _assert_states_close(a.state, b.state, tol=1e-9)
    assert all(math.isfinite(w) for w in b.weights.values())


@pytest.mark.parametrize("num_clients", [5, 6, 7])
def test_median_is_the_middle_value(num_clients: int) -> None:
    glob, updates = _round(5, num_clients)
    result = _run("median", glob, updates)
    for key in FLOAT_KEYS:
        rows = _rows(updates, key)
        expected = [_median([row[i] for row in rows]) for i in range(len(rows[0]))]
        assert _flat(result.state[key]) == _approx(expected)


def test_median_of_three_clients_is_the_middle_one() -> None:
    glob = {"w": torch.zeros(3, dtype=torch.float64)}
    values = [[1.0, 9.0, -5.0], [3.0, 2.0, 0.5], [2.0, -4.0, 7.0]]
    updates = [ClientUpdate(c, {"w": torch.tensor(v, dtype=torch.float64)}, 1 + c) for c, v in enumerate(values)]
    result = _run("median", glob, updates)
    assert result.state["w"].tolist() == [2.0, 2.0, 0.5]
    # client 2 is the middle value at coordinate 0, client 1 at 1 and 2: shares 1/3 and 2/3
    assert result.weights == pytest.approx({0: 0.0, 1: 2 / 3, 2: 1 / 3})
    assert result.flagged == frozenset({0})


@pytest.mark.parametrize(("num_clients", "beta"), [(7, 0.2), (7, 0.3), (6, 0.25), (5, 0.1)])
def test_trimmed_mean_drops_floor_beta_k_each_side(num_clients: int, beta: float) -> None:
    glob, updates = _round(6, num_clients)
    result = _run("trimmed_mean", glob, updates, trim_beta=beta)
    for key in FLOAT_KEYS:
        assert _flat(result.state[key]) == _approx(_naive_trimmed(updates, key, beta))


@pytest.mark.parametrize(("num_clients", "f"), [(5, None), (6, None), (7, None), (7, 0), (7, 1)])
def test_krum_picks_the_lowest_score(num_clients: int, f: int | None) -> None:
    glob, updates = _round(7, num_clients, scale=1.0)
    byzantine = (num_clients - 3) // 2 if f is None else f
    scores = _naive_krum_scores(updates, FLOAT_KEYS, byzantine)
    best = min(scores, key=lambda c: (scores[c], c))
    result = _run("krum", glob, updates, krum_f=f)
    chosen = next(u for u in updates if u.client_id == best)
    _assert_states_equal(result.state, chosen.state, keys=FLOAT_KEYS)
    assert result.weights == {u.client_id: (1.0 if u.client_id == best else 0.0) for u in updates}
    assert result.flagged == frozenset(u.client_id for u in updates) - {best}


@pytest.mark.parametrize(("num_clients", "f", "m"), [(7, None, None), (7, 1, None), (6, None, 2), (7, 2, 10)])
def test_multikrum_averages_the_m_lowest_scores(num_clients: int, f: int | None, m: int | None) -> None:
    glob, updates = _round(8, num_clients, scale=1.0)
    byzantine = (num_clients - 3) // 2 if f is None else f
    count = num_clients - byzantine if m is None else min(m, num_clients)
    scores = _naive_krum_scores(updates, FLOAT_KEYS, byzantine)
    selected = sorted(scores, key=lambda c: (scores[c], c))[:count]
    weights = {u.client_id: (1.0 / count if u.client_id in selected else 0.0) for u in updates}
    result = _run("multikrum", glob, updates, krum_f=f, multikrum_m=m)
    for key in FLOAT_KEYS:
        assert _flat(result.state[key]) == _approx(_naive_weighted(updates, weights, key))
    assert result.weights == pytest.approx(weights)
    assert result.flagged == frozenset(u.client_id for u in updates) - set(selected)


def _lpa_round(num_clients: int = 7) -> tuple[StateDict, list[ClientUpdate]]:
    """Client 2 deviates in 'fc.bias' only, client 11 in 'conv.weight' only."""
    glob, updates = _round(9, num_clients, scale=0.1)
    out = []
    for update in updates:
        if update.client_id == 2:
            update = _with_state(update, fc__bias=update.state["fc.bias"] + 3.0)
        if update.client_id == 11:
            update = _with_state(update, conv__weight=update.state["conv.weight"] - 2.0)
        out.append(update)
    return glob, out


@pytest.mark.parametrize("num_clients", [6, 7])  # even K: the centre is the mean of the two middle values
@pytest.mark.parametrize("kappa", [2.5, 1.0, 0.0])
def test_lpa_mad_rule_matches_naive_loop(kappa: float, num_clients: int) -> None:
    glob, updates = _lpa_round(num_clients)
    result = _run("lpa", glob, updates, lpa_kappa=kappa)
    shares = dict.fromkeys((u.client_id for u in updates), 0.0)
    for key in FLOAT_KEYS:
        expected, pruned = _naive_lpa(updates, key, kappa=kappa)
        assert _flat(result.state[key]) == _approx(expected)
        assert result.excluded_per_layer.get(key, ()) == tuple(pruned)
        kept = [u for u in updates if u.client_id not in pruned]
        for u in kept:
            shares[u.client_id] += u.num_examples / sum(v.num_examples for v in kept) / len(FLOAT_KEYS)
    assert 2 in result.excluded_per_layer["fc.bias"]
    assert 11 in result.excluded_per_layer["conv.weight"]
    assert result.weights == pytest.approx(shares, rel=TOL, abs=TOL)


def test_lpa_fraction_rule_drops_the_largest_deviations() -> None:
    glob, updates = _lpa_round()
    result = _run("lpa", glob, updates, lpa_rule="fraction", lpa_fraction=0.3)
    for key in FLOAT_KEYS:
        expected, pruned = _naive_lpa(updates, key, rule="fraction", fraction=0.3)
        assert len(pruned) == 2  # floor(0.3 · 7)
        assert _flat(result.state[key]) == _approx(expected)
        assert result.excluded_per_layer[key] == tuple(pruned)
    assert 2 in result.excluded_per_layer["fc.bias"] and 11 in result.excluded_per_layer["conv.weight"]


@pytest.mark.parametrize(("fraction", "pruned"), [(0.2, (4,)), (0.4, (3, 4)), (0.6, (2, 3, 4))])
def test_lpa_fraction_rule_breaks_ties_towards_the_larger_client_id(fraction: float, pruned: tuple[int, ...]) -> None:
    glob = {"w": torch.zeros(1, dtype=torch.float64)}
    values = [0.0, 1.0, -1.0, 2.0, -2.0]  # median 0, deviations 0, 1, 1, 2, 2
    updates = [ClientUpdate(c, {"w": torch.tensor([v], dtype=torch.float64)}, 1) for c, v in enumerate(values)]
    result = _run("lpa", glob, updates, lpa_rule="fraction", lpa_fraction=fraction)
    assert result.excluded_per_layer == {"w": pruned}
    kept = [v for c, v in enumerate(values) if c not in pruned]
    assert result.state["w"].item() == pytest.approx(sum(kept) / len(kept), abs=TOL)


def test_lpa_global_centre_measures_deviation_from_previous_state() -> None:
    glob, updates = _lpa_round()
    far = _with_state(updates[3], fc__bias=glob["fc.bias"] + 50.0)  # far from w_t, so pruned under both centres
    updates = [far if u.client_id == far.client_id else u for u in updates]
    result = _run("lpa", glob, updates, lpa_center="global")
    assert far.client_id in result.excluded_per_layer["fc.bias"]
    kept = [u for u in updates if u.client_id not in result.excluded_per_layer["fc.bias"]]
    assert _flat(result.state["fc.bias"]) == _approx(_naive_weighted(kept, _counts(kept), "fc.bias"))


@pytest.mark.parametrize("server_round", [3, 4, 10])
def test_ldawa_after_warmup_matches_naive_cosine_loop(server_round: int) -> None:
    glob, updates = _round(10, 6, scale=0.8)
    result = _run("ldawa", glob, updates, server_round=server_round)
    mean_cos = dict.fromkeys((u.client_id for u in updates), 0.0)
    for key in FLOAT_KEYS:
        expected, cosines = _naive_ldawa(glob, updates, key)
        assert any(c < 0.99 for c in cosines.values())  # the scaling matters in this data
        assert _flat(result.state[key]) == _approx(expected)
        for client, cos in cosines.items():
            mean_cos[client] += cos / len(FLOAT_KEYS)
    assert result.weights == pytest.approx({c: m / len(updates) for c, m in mean_cos.items()}, rel=TOL)
    assert result.flagged == frozenset(c for c, m in mean_cos.items() if m < 0.5)


def test_ldawa_clips_cosine_and_can_give_negative_weights() -> None:
    glob = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    values = {0: [2.0, 0.0], 1: [0.0, 3.0], 2: [-1.0, 1.0]}  # cosines 1, 0 and -1/√2
    updates = [ClientUpdate(c, {"w": torch.tensor(v, dtype=torch.float64)}, 1) for c, v in values.items()]
    result = _run("ldawa", glob, updates)
    c2 = -1 / math.sqrt(2)
    expected = [(2.0 + 0.0 + c2 * -1.0) / 3, (0.0 + 0.0 + c2 * 1.0) / 3]
    assert result.state["w"].tolist() == _approx(expected)
    assert result.flagged == frozenset({1, 2})


@pytest.mark.parametrize("server_round", [1, 2])
def test_ldawa_warmup_rounds_are_fedavg(server_round: int) -> None:
    glob, updates = _round(10, 6, scale=0.8)
    result = _run("ldawa", glob, updates, server_round=server_round)
    fedavg = FedAvg().aggregate(glob, updates, server_round)
    _assert_states_equal(result.state, fedavg.state)
    assert result.weights == fedavg.weights
    assert not result.flagged
    for key in FLOAT_KEYS:
        assert _flat(result.state[key]) == _approx(_naive_weighted(updates, _counts(updates), key))


def test_ldawa_warmup_option() -> None:
    glob, updates = _round(10, 6, scale=0.8)
    fedavg = FedAvg().aggregate(glob, updates, 1).state
    no_warmup = _run("ldawa", glob, updates, server_round=1, ldawa_warmup_rounds=0).state
    assert _flat(no_warmup["fc.bias"]) == _approx(_naive_ldawa(glob, updates, "fc.bias")[0])
    assert not torch.allclose(no_warmup["fc.bias"], fedavg["fc.bias"])
    long_warmup = _run("ldawa", glob, updates, server_round=4, ldawa_warmup_rounds=4).state
    _assert_states_equal(long_warmup, fedavg)


# ------------------------------------------------------------------------------------------------ limit cases
def test_ldawa_with_all_cosines_one_is_the_uniform_mean() -> None:
    glob, updates = _round(11, 6)
    multiples = [
        ClientUpdate(u.client_id, {**{k: (0.5 + i) * glob[k] for k in FLOAT_KEYS}, INT_KEY: u.state[INT_KEY]},
                     u.num_examples)
        for i, u in enumerate(updates)
    ]
    ldawa = _run("ldawa", glob, multiples)
    fairavg = _run("fairavg", glob, multiples)
    _assert_states_close(ldawa.state, fairavg.state)
    assert ldawa.weights == pytest.approx(fairavg.weights, rel=TOL)


def test_ldawa_clips_cosines_that_round_above_one() -> None:
    base = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    glob = {"conv.weight": base}

    def unclipped(factor: float) -> float:
        a, b = base.reshape(-1), factor * base.reshape(-1)
        return float(torch.dot(a, b)) / (float(torch.linalg.vector_norm(a)) * float(torch.linalg.vector_norm(b)))

    factors = [f for f in (3.0, 0.7, 2.0, 5.0, 0.3) if unclipped(f) > 1.0]
    assert len(factors) >= 2  # rounding pushes these cosines above 1
    updates = [ClientUpdate(c, {"conv.weight": f * base}, 1) for c, f in enumerate(factors)]
    result = _run("ldawa", glob, updates)
    assert all(w == 1.0 / len(updates) for w in result.weights.values())
    _assert_states_equal(result.state, _run("fairavg", glob, updates).state)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trimmed_mean_with_beta_zero_is_the_uniform_mean(seed: int) -> None:
    glob, updates = _round(seed, 7)
    trimmed = _run("trimmed_mean", glob, updates, trim_beta=0.0)
    _assert_states_close(trimmed.state, _run("fairavg", glob, updates).state)
    assert not trimmed.flagged


def test_trimmed_mean_small_beta_trims_nothing() -> None:
    glob, updates = _round(12, 6)  # floor(0.1 · 6) = 0
    trimmed = _run("trimmed_mean", glob, updates, trim_beta=0.1).state
    _assert_states_close(trimmed, _run("fairavg", glob, updates).state)


OPT: dict[str, Any] = {"server_lr": 0.3, "server_beta1": 0.8, "server_beta2": 0.95, "server_tau": 0.1}


def _fedopt_round(seed: int, glob: StateDict | None = None) -> tuple[StateDict, list[ClientUpdate]]:
    """Updates whose deltas straddle τ = 0.1 (so both signs of Yogi's sign(v − Δ²) occur)."""
    base, updates = _round(seed, 5, scale=0.25)
    if glob is None:
        return base, updates
    moved = [ClientUpdate(u.client_id, {**{k: glob[k] + (u.state[k] - base[k]) for k in FLOAT_KEYS},
                                        INT_KEY: u.state[INT_KEY]}, u.num_examples) for u in updates]
    return glob, moved


def _naive_delta(glob: StateDict, updates: Sequence[ClientUpdate], key: str) -> list[float]:
    counts = _counts(updates)
    reference = _flat(glob[key])
    rows = {u.client_id: _flat(u.state[key]) for u in updates}
    return [sum(counts[c] * (rows[c][i] - reference[i]) for c in rows) for i in range(len(reference))]


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimiser_first_step_matches_its_equation(name: str) -> None:
    lr, b1, b2, tau = OPT["server_lr"], OPT["server_beta1"], OPT["server_beta2"], OPT["server_tau"]
    glob, updates = _fedopt_round(13)
    result = _run(name, glob, updates, **OPT)
    deltas = [abs(d) for key in FLOAT_KEYS for d in _naive_delta(glob, updates, key)]
    assert min(deltas) < tau < max(deltas)
    for key in FLOAT_KEYS:
        delta = _naive_delta(glob, updates, key)
        expected = []
        for w, d in zip(_flat(glob[key]), delta, strict=True):
            m1 = (1 - b1) * d
            if name == "fedadam":
                v1 = b2 * tau**2 + (1 - b2) * d**2
            else:
                v1 = tau**2 - (1 - b2) * d**2 * math.copysign(1.0, tau**2 - d**2)
            expected.append(w + lr * m1 / (math.sqrt(v1) + tau))
        assert _flat(result.state[key]) == _approx(expected, 1e-10)
    assert result.weights == pytest.approx(_counts(updates))
    assert not result.flagged


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimiser_averages_statistics_and_steps_parameters(name: str) -> None:
    glob, updates = _fedopt_round(13)
    # fc.bias plays a BatchNorm statistic: with server_averaged naming it, it takes FedAvg's mean.
    result = _run(name, glob, updates, **OPT, server_averaged=["bias"])
    fedavg = _run("fedavg", glob, updates).state
    _assert_states_close({"fc.bias": result.state["fc.bias"]}, {"fc.bias": fedavg["fc.bias"]})
    stepped = _run(name, glob, updates, **OPT, server_averaged=[]).state
    assert not torch.allclose(stepped["fc.bias"], fedavg["fc.bias"], rtol=1e-6, atol=1e-9)
    _assert_states_equal({"conv.weight": result.state["conv.weight"]}, {"conv.weight": stepped["conv.weight"]})


def test_fedadam_and_fedyogi_differ() -> None:
    glob, updates = _fedopt_round(13)
    adam, yogi = _run("fedadam", glob, updates, **OPT).state, _run("fedyogi", glob, updates, **OPT).state
    assert not torch.allclose(adam["fc.bias"], yogi["fc.bias"], rtol=1e-9, atol=1e-12)


def test_fedadam_second_step_uses_the_stored_moments() -> None:
    lr, b1, b2, tau = OPT["server_lr"], OPT["server_beta1"], OPT["server_beta2"], OPT["server_tau"]
    optimiser = _build("fedadam", **OPT)
    glob0, updates1 = _fedopt_round(14)
    glob1 = optimiser.aggregate(glob0, updates1, 1).state
    _, updates2 = _fedopt_round(15, glob=glob1)
    glob2 = optimiser.aggregate(glob1, updates2, 2).state
    fresh = _run("fedadam", glob1, updates2, **OPT).state
    for key in FLOAT_KEYS:
        expected = []
        deltas1, deltas2 = _naive_delta(glob0, updates1, key), _naive_delta(glob1, updates2, key)
        for w, d1, d2 in zip(_flat(glob1[key]), deltas1, deltas2, strict=True):
            m1, v1 = (1 - b1) * d1, b2 * tau**2 + (1 - b2) * d1**2
            m2, v2 = b1 * m1 + (1 - b1) * d2, b2 * v1 + (1 - b2) * d2**2
            expected.append(w + lr * m2 / (math.sqrt(v2) + tau))
        assert _flat(glob2[key]) == _approx(expected, 1e-10)
        assert not torch.allclose(glob2[key], fresh[key], rtol=1e-9, atol=1e-12)  # the moments matter


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimiser_state_dict_round_trip(name: str) -> None:
    original: Any = _build(name, **OPT)
    glob0, updates1 = _fedopt_round(16)
    glob1 = original.aggregate(glob0, updates1, 1).state
    saved = original.state_dict()
    assert set(saved) == {f"{p}/{k}" for p in ("m", "v") for k in FLOAT_KEYS}
    restored: Any = _build(name, **OPT)
    restored.load_state_dict(saved)
    for tensor in saved.values():  # the restored optimiser holds copies
        tensor.add_(1.0)
    _, updates2 = _fedopt_round(17, glob=glob1)
    a = original.aggregate(glob1, updates2, 2).state
    b = restored.aggregate(glob1, updates2, 2).state
    _assert_states_equal(a, b)
    _assert_states_equal(original.state_dict(), restored.state_dict())
    c = _build(name, **OPT).aggregate(glob1, updates2, 2).state
    assert not torch.allclose(a["conv.weight"], c["conv.weight"], rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------ robustness
HONEST = 7
ATTACKERS = frozenset({100, 101})


def _attacked_round() -> tuple[StateDict, list[ClientUpdate], dict[str, torch.Tensor]]:
    """Seven honest clients within 0.01 of a point, two attackers at +100; equal counts."""
    gen = torch.Generator().manual_seed(18)
    glob = _state(gen)
    point = _state(gen, base=glob, scale=0.5)
    updates = [ClientUpdate(k, _state(gen, base=point, scale=0.01, count=100 + k), 50, {"train_loss": 1.0})
               for k in range(HONEST)]
    updates += [ClientUpdate(c, {**{k: point[k] + 100.0 for k in FLOAT_KEYS}, INT_KEY: torch.tensor(100)}, 50,
                             {"train_loss": 1.0}) for c in sorted(ATTACKERS)]
    honest_mean = {k: torch.stack([u.state[k] for u in updates[:HONEST]]).mean(dim=0) for k in FLOAT_KEYS}
    return glob, updates, honest_mean


@pytest.mark.parametrize(("name", "options"), [("median", {}), ("trimmed_mean", {"trim_beta": 0.3}), ("krum", {}),
                                               ("multikrum", {}), ("lpa", {})])
def test_robust_rules_resist_two_far_attackers(name: str, options: dict) -> None:
    glob, updates, honest_mean = _attacked_round()
    result = _run(name, glob, updates, **options)
    for key in FLOAT_KEYS:
        assert (result.state[key] - honest_mean[key]).abs().max() < 0.05, key
    assert ATTACKERS <= result.flagged
    assert all(result.weights[c] == 0.0 for c in ATTACKERS)
    assert not result.rejected
    honest_ids = frozenset(range(HONEST))
    selected = frozenset(c for c, w in result.weights.items() if w > 0)
    if name == "krum":
        assert len(selected) == 1 and selected <= honest_ids
        assert result.flagged == (honest_ids | ATTACKERS) - selected
    if name == "multikrum":  # m = K − f = 9 − 3
        assert len(selected) == 6 and selected <= honest_ids
        assert result.flagged == (honest_ids | ATTACKERS) - selected
    if name == "lpa":
        assert set(result.excluded_per_layer) == set(FLOAT_KEYS)
        assert all(ATTACKERS <= set(result.excluded_per_layer[key]) for key in FLOAT_KEYS)
        assert result.flagged <= honest_ids | ATTACKERS
    if name in ("krum", "multikrum", "median", "trimmed_mean"):
        assert not result.excluded_per_layer


def test_fedavg_is_dragged_by_the_attackers_and_flags_nobody() -> None:
    glob, updates, honest_mean = _attacked_round()
    result = _run("fedavg", glob, updates)
    for key in FLOAT_KEYS:  # 2/9 of the +100 shift
        assert (result.state[key] - honest_mean[key]).abs().min() > 10.0
    assert not result.flagged


# ------------------------------------------------------------------------------------------------ screening
def _poisoned_round() -> tuple[StateDict, list[ClientUpdate], list[ClientUpdate], dict[int, str]]:
    """(global, all updates, the good ones, bad client id → pattern its reason must match)."""
    glob, good = _round(19, 6)
    template = good[0]
    nan = _with_state(ClientUpdate(90, template.state, 10, template.metrics),
                      fc__bias=torch.tensor([0.0, math.nan, 1.0], dtype=torch.float64))
    inf = _with_state(ClientUpdate(91, template.state, 10, template.metrics),
                      conv__weight=torch.full((2, 3), -math.inf, dtype=torch.float64))
    shape = _with_state(ClientUpdate(92, template.state, 10, template.metrics),
                        fc__bias=torch.zeros(4, dtype=torch.float64))
    reasons = {90: r"client 90: key 'fc.bias' .*1 NaN", 91: r"client 91: key 'conv.weight' .*6 Inf",
               92: r"client 92: key 'fc.bias' must have shape \(3,\)"}
    mixed = [good[0], nan, good[1], good[2], inf, good[3], shape, good[4], good[5]]
    return glob, mixed, good, reasons


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_every_rule_rejects_nan_inf_and_wrong_shape_updates(name: str, caplog: pytest.LogCaptureFixture) -> None:
    glob, mixed, good, reasons = _poisoned_round()
    with caplog.at_level(logging.WARNING, logger="fedcore.aggregation"):
        result = _run(name, glob, mixed)
    assert set(result.rejected) == set(reasons)
    for client, pattern in reasons.items():
        assert re.search(pattern, result.rejected[client]), result.rejected[client]
        assert client not in result.weights
        warnings = [r for r in caplog.records if r.name == "fedcore.aggregation" and r.levelno == logging.WARNING
                    and f"client {client}" in r.getMessage()]
        assert len(warnings) == 1
    assert set(reasons) <= result.flagged
    alone = _run(name, glob, good)
    _assert_states_equal(result.state, alone.state)
    assert result.weights == alone.weights
    assert result.flagged == alone.flagged | set(reasons)


@pytest.mark.parametrize("name", AGGREGATORS.names())
@pytest.mark.parametrize("problem", ["missing", "extra", "dtype"])
def test_every_rule_rejects_mismatched_keys_and_dtypes(name: str, problem: str) -> None:
    glob, good = _round(20, 6)
    table: dict[str, dict[str, torch.Tensor | None]] = {
        "missing": {"fc__bias": None},
        "extra": {"head__weight": torch.zeros(2)},
        "dtype": {"fc__bias": torch.zeros(3, dtype=torch.float32)},
    }
    entries = table[problem]
    bad = _with_state(ClientUpdate(50, good[0].state, 10, good[0].metrics), **entries)
    result = _run(name, glob, [*good, bad])
    assert set(result.rejected) == {50} and 50 in result.flagged
    assert result.rejected[50].startswith("client 50: ")
    assert ("fc.bias" if problem != "extra" else "head.weight") in result.rejected[50]
    _assert_states_equal(result.state, _run(name, glob, good).state)


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_every_rule_raises_when_every_update_is_rejected(name: str) -> None:
    glob, updates = _round(21, 6)
    broken = [_with_state(u, fc__bias=torch.full((3,), math.nan, dtype=torch.float64)) for u in updates]
    with pytest.raises(QuorumError, match=r"round 5 needs at least 1 accepted update .*Got 0\. Rejected: client 2: "
                                          r".*client 17: "):
        _run(name, glob, broken)


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_every_rule_rejects_failed_clients_and_keeps_its_quorum(name: str) -> None:
    """The failure policy is the shared procedure's: every rule rejects failed clients and honours the quorum."""
    glob, updates = _round(25, 7)
    failed = {90: "training raised RuntimeError: out of memory"}
    result = _build(name).aggregate(glob, updates, ROUND, failed=failed, min_accepted=len(updates))
    assert result.rejected == {90: "client 90: training raised RuntimeError: out of memory"}
    assert 90 in result.flagged and 90 not in result.weights
    _assert_states_equal(result.state, _run(name, glob, updates).state)
    with pytest.raises(QuorumError, match=rf"needs at least {len(updates) + 1} accepted updates .*client 90"):
        _build(name).aggregate(glob, updates, ROUND, failed=failed, min_accepted=len(updates) + 1)


@pytest.mark.parametrize("name", AGGREGATORS.names())
@pytest.mark.parametrize("kind", ["empty", "duplicate", "zero_count", "negative_count", "float_count"])
def test_every_rule_raises_on_caller_bugs(name: str, kind: str) -> None:
    glob, updates = _round(22, 6)
    bad = {
        "empty": [],
        "duplicate": [*updates, updates[2]],
        "zero_count": _with_counts(updates, [0, *[u.num_examples for u in updates[1:]]]),
        "negative_count": _with_counts(updates, [-4, *[u.num_examples for u in updates[1:]]]),
        "float_count": _with_counts(updates, [3.0, *[u.num_examples for u in updates[1:]]]),  # type: ignore[list-item]
    }[kind]
    with pytest.raises(AggregationError):
        _run(name, glob, bad)


@pytest.mark.parametrize("metrics", [{}, {"train_loss": math.nan}, {"train_loss": math.inf}, {"train_loss": "0.3"}])
def test_loss_rule_rejects_updates_without_a_finite_train_loss(
    metrics: dict, caplog: pytest.LogCaptureFixture
) -> None:
    glob, good = _round(23, 6)
    bad = ClientUpdate(60, good[0].state, 10, metrics)
    with caplog.at_level(logging.WARNING, logger="fedcore.aggregation"):
        result = _run("loss", glob, [*good, bad])
    assert set(result.rejected) == {60} and 60 in result.flagged
    assert "client 60: metric 'train_loss' must be a finite number" in result.rejected[60]
    assert any("client 60" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    _assert_states_equal(result.state, _run("loss", glob, good).state)
    # the other rules do not need the metric
    assert not _run("fedavg", glob, [*good, bad]).rejected


@pytest.mark.parametrize("name", ["krum", "multikrum"])
def test_krum_needs_more_than_2f_plus_2_updates(name: str) -> None:
    glob, updates = _round(24, 7)
    _run(name, glob, updates, krum_f=2)  # 7 > 6
    with pytest.raises(AggregationError, match=r"more than 2f \+ 2 = 6 accepted updates \(f = 2\). Got 6"):
        _run(name, glob, updates[:6], krum_f=2)
    with pytest.raises(AggregationError, match=r"2f \+ 2 = 2 .*Got 2"):
        _run(name, glob, updates[:2])  # default f = 0
    _run(name, glob, updates[:3])
    # rejections count: one NaN update leaves 6 accepted
    broken = [_with_state(updates[0], fc__bias=torch.full((3,), math.nan, dtype=torch.float64)), *updates[1:]]
    with pytest.raises(AggregationError, match=r"Got 6"):
        _run(name, glob, broken, krum_f=2)


# ------------------------------------------------------------------------------------ integer entries, dtypes, memory
@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_integer_entry_is_the_rounded_fedavg_mean(name: str) -> None:
    glob, updates = _round(25, 6, float32=True)
    mean = sum(u.num_examples * int(u.state[INT_KEY]) for u in updates) / sum(u.num_examples for u in updates)
    assert abs(mean - math.floor(mean) - 0.5) > 1e-6 and mean != int(mean)  # neither a tie nor an integer
    result = _run(name, glob, updates).state
    assert result[INT_KEY].dtype == torch.int64
    assert result[INT_KEY].shape == ()
    assert int(result[INT_KEY]) == _naive_int_mean(updates)


@pytest.mark.parametrize("name", AGGREGATORS.names())
@pytest.mark.parametrize("identical", [False, True])
def test_output_keeps_global_dtypes_and_shares_no_memory(name: str, identical: bool) -> None:
    glob, updates = _round(26, 6, float32=True)
    if identical:
        updates = [ClientUpdate(u.client_id, updates[0].state, u.num_examples, u.metrics) for u in updates]
    snapshots = [clone_state(glob), *[clone_state(u.state) for u in updates]]
    result = _run(name, glob, updates).state
    assert list(result) == list(glob)
    sources = [glob, *[u.state for u in updates]]
    for key, reference in glob.items():
        assert result[key].dtype == reference.dtype and result[key].shape == reference.shape, key
        assert result[key].device == reference.device
        for source in sources:
            assert result[key].untyped_storage().data_ptr() != source[key].untyped_storage().data_ptr(), key
    for source, snapshot in zip(sources, snapshots, strict=True):  # inputs unchanged
        _assert_states_equal(source, snapshot)
    assert result["fc.weight"].dtype == torch.float32


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("trimmed_mean", {"trim_beta": 0.5}),
        ("trimmed_mean", {"trim_beta": -0.1}),
        ("lpa", {"lpa_rule": "x"}),
        ("lpa", {"lpa_kappa": -1.0}),
        ("lpa", {"lpa_fraction": 1.0}),
        ("lpa", {"lpa_center": "mean"}),
        ("loss", {"loss_gamma": 2}),
        ("loss", {"loss_gamma": -0.1}),
        ("loss", {"loss_gamma": math.nan}),
        ("loss", {"loss_scale": "mean"}),
        ("loss", {"loss_scale": "Relative"}),
        ("loss", {"loss_scale": None}),
        ("loss", {"loss_temperature": 0.0}),
        ("loss", {"loss_temperature": -1.0}),
        ("loss", {"loss_temperature": math.inf}),
        ("loss", {"loss_temperature": math.nan}),
        ("loss", {"loss_temperature": True}),
        ("fedadam", {"server_lr": 0}),
        ("fedyogi", {"server_lr": -1.0}),
        ("fedadam", {"server_beta1": 1.0}),
        ("fedyogi", {"server_beta2": -0.5}),
        ("fedadam", {"server_tau": 0.0}),
        ("krum", {"krum_f": -1}),
        ("multikrum", {"krum_f": -1}),
        ("krum", {"krum_f": 1.5}),
        ("multikrum", {"multikrum_m": 0}),
        ("ldawa", {"ldawa_warmup_rounds": -1}),
    ],
)
def test_bad_options_raise_value_error(name: str, options: dict) -> None:
    option = next(iter(options))
    with pytest.raises(ValueError, match=option):
        _build(name, **options)


@pytest.mark.parametrize("name", AGGREGATORS.names())
@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_every_rule_checks_flag_ratio(name: str, ratio: float) -> None:
    with pytest.raises(ValueError, match="flag_ratio"):
        _build(name, flag_ratio=ratio)


def test_unknown_rule_name_raises() -> None:
    with pytest.raises(ValueError, match="Unknown aggregator 'mean'"):
        _build("mean")
