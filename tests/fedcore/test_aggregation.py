"""Aggregation: FedAvg against a naive loop, its algebraic properties, the integer-buffer rule and the screening."""

from __future__ import annotations

import math
import re

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from fedcore.aggregation import (
    AGGREGATORS,
    Aggregator,
    ClientUpdate,
    FedAvg,
    StateDict,
    check_updates,
    clone_state,
    state_nbytes,
    to_cpu_state,
)
from fedcore.errors import AggregationError, QuorumError
from fedcore.federation.policy import required_updates


def _state(weight: list[list[float]], bias: list[float], count: int) -> StateDict:
    return {
        "layer.weight": torch.tensor(weight, dtype=torch.float32),
        "layer.bias": torch.tensor(bias, dtype=torch.float32),
        "bn.num_batches_tracked": torch.tensor(count, dtype=torch.int64),
    }


GLOBAL = _state([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0], 0)
UPDATES = [
    ClientUpdate(0, _state([[1.0, 2.0], [3.0, 4.0]], [1.0, -1.0], 10), 1, {"train_loss": 0.5}),
    ClientUpdate(1, _state([[-2.0, 0.5], [0.0, 8.0]], [0.0, 3.0], 20), 3, {"train_loss": 0.7}),
    ClientUpdate(2, _state([[4.0, -6.0], [1.0, 1.0]], [2.0, 2.0], 40), 6, {"train_loss": 0.9}),
]


def _naive_fedavg(updates: list[ClientUpdate]) -> dict[str, list[float]]:
    total = sum(u.num_examples for u in updates)
    out: dict[str, list[float]] = {}
    for key in updates[0].state:
        flat = [u.state[key].flatten().tolist() for u in updates]
        out[key] = [sum(u.num_examples * values[i] for u, values in zip(updates, flat, strict=True)) / total
                    for i in range(len(flat[0]))]
    return out


# ------------------------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_aggregator_builds_from_defaults_keeps_keys_shapes_dtypes(name: str) -> None:
    aggregator = AGGREGATORS.build(name)
    assert isinstance(aggregator, Aggregator)
    result = aggregator.aggregate(GLOBAL, UPDATES, server_round=1).state
    assert set(result) == set(GLOBAL)
    for key, tensor in GLOBAL.items():
        assert result[key].shape == tensor.shape and result[key].dtype == tensor.dtype
    again = AGGREGATORS.build(name).aggregate(GLOBAL, UPDATES, server_round=1).state
    assert all(torch.equal(result[k], again[k]) for k in result)


# ------------------------------------------------------------------------------------------------ oracle
def test_fedavg_matches_naive_loop_with_unequal_weights() -> None:
    result = FedAvg().aggregate(GLOBAL, UPDATES, server_round=1).state
    expected = _naive_fedavg(UPDATES)
    for key in ("layer.weight", "layer.bias"):
        assert result[key].flatten().tolist() == pytest.approx(expected[key], rel=1e-6)
    # by hand: weight[0, 0] = (1·1 + 3·(−2) + 6·4) / 10 = 1.9; differs from the unweighted mean 1.0
    assert result["layer.weight"][0, 0].item() == pytest.approx(1.9)


def test_fedavg_integer_buffer_is_rounded_weighted_mean() -> None:
    result = FedAvg().aggregate(GLOBAL, UPDATES, server_round=1).state
    # (1·10 + 3·20 + 6·40) / 10 = 31.0
    assert result["bn.num_batches_tracked"].dtype == torch.int64
    assert result["bn.num_batches_tracked"].item() == 31
    updates = [ClientUpdate(0, {"n": torch.tensor(1)}, 1), ClientUpdate(1, {"n": torch.tensor(2)}, 2)]
    # (1 + 4) / 3 = 1.67 → 2 (nearest); ties go to even: (1 + 2) / 2 = 1.5 → 2, (2 + 3) / 2 = 2.5 → 2
    assert FedAvg().aggregate({"n": torch.tensor(0)}, updates, 1).state["n"].item() == 2
    ties = [ClientUpdate(0, {"n": torch.tensor(2)}, 1), ClientUpdate(1, {"n": torch.tensor(3)}, 1)]
    assert FedAvg().aggregate({"n": torch.tensor(0)}, ties, 1).state["n"].item() == 2


def test_fedavg_averages_in_float64_and_casts_back() -> None:
    glob = {"w": torch.zeros(1, dtype=torch.float16)}
    updates = [ClientUpdate(0, {"w": torch.tensor([1.0], dtype=torch.float16)}, 1),
               ClientUpdate(1, {"w": torch.tensor([2.0], dtype=torch.float16)}, 2)]
    result = FedAvg().aggregate(glob, updates, 1).state["w"]
    assert result.dtype == torch.float16
    assert result.item() == torch.tensor(5.0 / 3.0, dtype=torch.float16).item()


def test_fedavg_does_not_modify_or_alias_inputs() -> None:
    glob_copy, updates_copy = clone_state(GLOBAL), [clone_state(u.state) for u in UPDATES]
    result = FedAvg().aggregate(GLOBAL, UPDATES, server_round=1).state
    for original, copy in zip([GLOBAL, *[u.state for u in UPDATES]], [glob_copy, *updates_copy], strict=True):
        assert all(torch.equal(original[k], copy[k]) for k in original)
    for key, tensor in result.items():
        for source in [GLOBAL, *[u.state for u in UPDATES]]:
            assert tensor.untyped_storage().data_ptr() != source[key].untyped_storage().data_ptr()


def test_fedavg_single_client_returns_its_state_as_a_copy() -> None:
    result = FedAvg().aggregate(GLOBAL, UPDATES[1:2], server_round=1).state
    assert all(torch.equal(result[k], UPDATES[1].state[k]) for k in result)
    assert result["layer.weight"] is not UPDATES[1].state["layer.weight"]


# ------------------------------------------------------------------------------------------------ properties
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)
# float64 entries: there the summation order would show in the result
wide = st.floats(min_value=-1e15, max_value=1e15, allow_nan=False, allow_subnormal=False)


@st.composite
def client_sets(draw: st.DrawFn) -> tuple[StateDict, list[ClientUpdate]]:
    num_clients = draw(st.integers(1, 6))
    size = draw(st.integers(1, 5))
    updates = []
    for client in range(num_clients):
        values = draw(st.lists(finite, min_size=size, max_size=size))
        values64 = draw(st.lists(wide, min_size=2, max_size=2))
        count = draw(st.integers(0, 1000))
        state = {
            "w": torch.tensor(values, dtype=torch.float32),
            "w64": torch.tensor(values64, dtype=torch.float64),
            "count": torch.tensor(count),
        }
        updates.append(ClientUpdate(client * 3 + 1, state, draw(st.integers(1, 10_000))))
    glob = {"w": torch.zeros(size), "w64": torch.zeros(2, dtype=torch.float64), "count": torch.tensor(0)}
    return glob, updates


@settings(max_examples=60, deadline=None)
@given(client_sets(), st.randoms(use_true_random=False))
def test_fedavg_property_permutation_invariant_bit_exact(
    data: tuple[StateDict, list[ClientUpdate]], random: object
) -> None:
    glob, updates = data
    shuffled = list(updates)
    random.shuffle(shuffled)  # type: ignore[attr-defined]
    a, b = FedAvg().aggregate(glob, updates, 1).state, FedAvg().aggregate(glob, shuffled, 1).state
    assert all(torch.equal(a[k], b[k]) for k in a)


@settings(max_examples=60, deadline=None)
@given(client_sets(), st.integers(2, 1000))
def test_fedavg_property_scaling_num_examples_leaves_result_unchanged(
    data: tuple[StateDict, list[ClientUpdate]], factor: int
) -> None:
    glob, updates = data
    scaled = [ClientUpdate(u.client_id, u.state, u.num_examples * factor) for u in updates]
    a, b = FedAvg().aggregate(glob, updates, 1).state, FedAvg().aggregate(glob, scaled, 1).state
    assert all(torch.equal(a[k], b[k]) for k in a)


@settings(max_examples=60, deadline=None)
@given(client_sets())
def test_fedavg_property_identical_inputs_are_a_fixed_point(data: tuple[StateDict, list[ClientUpdate]]) -> None:
    glob, updates = data
    same = [ClientUpdate(u.client_id, updates[0].state, u.num_examples) for u in updates]
    result = FedAvg().aggregate(glob, same, 1).state
    # exact for float32 and integer entries (float64 sums round back); float64 entries within rounding
    assert torch.equal(result["w"], updates[0].state["w"])
    assert torch.equal(result["count"], updates[0].state["count"])
    torch.testing.assert_close(result["w64"], updates[0].state["w64"], rtol=1e-14, atol=0.0)


@settings(max_examples=60, deadline=None)
@given(client_sets())
def test_fedavg_property_within_coordinatewise_min_max(data: tuple[StateDict, list[ClientUpdate]]) -> None:
    glob, updates = data
    result = FedAvg().aggregate(glob, updates, 1).state
    for key, slack in (("w", 0.0), ("count", 0.0), ("w64", 1e-14)):
        stacked = torch.stack([u.state[key] for u in updates]).double()
        low, high = stacked.min(dim=0).values, stacked.max(dim=0).values
        assert (result[key] >= low - slack * low.abs()).all()
        assert (result[key] <= high + slack * high.abs()).all()


def test_fedavg_sums_in_client_id_order_whatever_the_arrival_order() -> None:
    # float64 terms whose sum depends on the order: 1e16/3 + 1/3 − 1e16/3
    values = {0: 1e16, 1: 1.0, 2: -1e16}
    updates = [ClientUpdate(c, {"w": torch.tensor([v], dtype=torch.float64)}, 1) for c, v in values.items()]
    glob = {"w": torch.zeros(1, dtype=torch.float64)}
    orders = (updates, updates[::-1], updates[1:] + updates[:1])
    results = {FedAvg().aggregate(glob, order, 1).state["w"].item() for order in orders}
    assert len(results) == 1


# ------------------------------------------------------------------------------------------------ rejections
def _with(client: int, **changes: object) -> list[ClientUpdate]:
    """UPDATES with client ``client``'s state or num_examples changed."""
    out = []
    for update in UPDATES:
        if update.client_id == client:
            state = dict(update.state)
            for key, value in changes.get("state", {}).items():  # type: ignore[union-attr]
                if value is None:
                    del state[key]
                else:
                    state[key] = value
            num = changes.get("num_examples", update.num_examples)
            update = ClientUpdate(update.client_id, state, num)  # type: ignore[arg-type]
        out.append(update)
    return out


@pytest.mark.parametrize(
    ("updates", "bad", "match"),
    [
        (_with(1, state={"layer.bias": torch.tensor([math.nan, 0.0])}), 1, r"client 1: key 'layer.bias' .*1 NaN"),
        (_with(2, state={"layer.weight": torch.full((2, 2), math.inf)}), 2, r"client 2: key 'layer.weight' .*4 Inf"),
        (_with(0, state={"layer.bias": torch.zeros(3)}), 0, r"client 0: key 'layer.bias' must have shape \(2,\)"),
        (_with(1, state={"layer.bias": None}), 1, r"client 1: .*missing \['layer.bias'\]"),
        (_with(2, state={"extra": torch.zeros(1)}), 2, r"client 2: .*extra \['extra'\]"),
        (_with(2, state={"layer.bias": torch.zeros(2, dtype=torch.float64)}), 2,
         r"client 2: key 'layer.bias' .*dtype"),
    ],
)
def test_fedavg_rejects_bad_update_and_aggregates_the_rest(
    updates: list[ClientUpdate], bad: int, match: str, caplog: pytest.LogCaptureFixture
) -> None:
    snapshot = clone_state(GLOBAL)
    with caplog.at_level("WARNING", logger="fedcore.aggregation"):
        result = FedAvg().aggregate(GLOBAL, updates, server_round=1)
    assert set(result.rejected) == {bad}
    assert re.search(match, result.rejected[bad])
    assert result.flagged == frozenset({bad})
    assert bad not in result.weights
    assert any(f"client {bad}" in record.getMessage() for record in caplog.records if record.levelname == "WARNING")
    good = [u for u in UPDATES if u.client_id != bad]
    expected = FedAvg().aggregate(GLOBAL, good, server_round=1).state
    assert all(torch.equal(result.state[k], expected[k]) for k in GLOBAL)
    assert all(torch.equal(GLOBAL[k], snapshot[k]) for k in GLOBAL)


def test_fedavg_raises_when_every_update_is_rejected() -> None:
    updates = [ClientUpdate(u.client_id, {**u.state, "layer.bias": torch.tensor([math.nan, 0.0])}, u.num_examples)
               for u in UPDATES]
    with pytest.raises(QuorumError, match=r"round 1 needs at least 1 accepted update .* of 3\. Got 0.*client 0.*"
                                          r"client 2"):
        FedAvg().aggregate(GLOBAL, updates, server_round=1)


def test_failed_clients_are_rejected_and_the_round_goes_on_above_the_quorum() -> None:
    """A client whose training raised is rejected (and flagged) with its reason; the others are averaged."""
    nan = ClientUpdate(2, {**UPDATES[2].state, "layer.bias": torch.tensor([math.nan, 0.0])}, UPDATES[2].num_examples)
    updates = [UPDATES[0], UPDATES[1], nan]
    result = FedAvg().aggregate(GLOBAL, updates, server_round=1, failed={7: "training raised OSError: disk"},
                                min_accepted=2)
    expected = FedAvg().aggregate(GLOBAL, UPDATES[:2], server_round=1).state
    assert all(torch.equal(result.state[k], expected[k]) for k in GLOBAL)
    assert sorted(result.rejected) == [2, 7] and "disk" in result.rejected[7] and "finite" in result.rejected[2]
    assert {2, 7} <= result.flagged
    with pytest.raises(QuorumError, match=r"needs at least 3 accepted updates .* of 4\. Got 2.*client 2.*client 7: "
                                          r"training raised OSError: disk") as caught:
        FedAvg().aggregate(GLOBAL, updates, server_round=1, failed={7: "training raised OSError: disk"},
                           min_accepted=3)
    assert sorted(caught.value.rejected) == [2, 7] and caught.value.server_round == 1
    with pytest.raises(QuorumError, match="no client of the round sent an update|client 7"):
        FedAvg().aggregate(GLOBAL, [], server_round=4, failed={7: "training raised OSError: disk"})
    with pytest.raises(AggregationError, match="either fail or send an update"):
        FedAvg().aggregate(GLOBAL, updates, server_round=1, failed={2: "raised"})


@pytest.mark.parametrize(("min_accepted", "jobs", "needed"), [
    (0.5, 10, 5), (0.5, 5, 3), (0.5, 1, 1), (1.0, 4, 4), (0.01, 10, 1), (3, 10, 3), (3, 2, 2), (1, 0, 1),
])
def test_required_updates_reads_a_count_or_a_share(min_accepted: float, jobs: int, needed: int) -> None:
    assert required_updates(min_accepted, jobs) == needed


@pytest.mark.parametrize("bad", [0, -1, 0.0, 1.5, True, "half"])
def test_required_updates_refuses_a_bad_quorum(bad: object) -> None:
    with pytest.raises(ValueError, match="'min_accepted' must be an int >= 1 or a float in \\(0, 1\\]"):
        required_updates(bad, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("updates", "match"),
    [
        (_with(1, num_examples=0), r"client 1: 'num_examples' must be an int > 0. Got 0"),
        (_with(0, num_examples=-3), r"client 0: 'num_examples' must be an int > 0. Got -3"),
        (_with(0, num_examples=2.0), r"client 0: 'num_examples' must be an int > 0. Got 2.0"),
        ([], r"no client of the round sent an update"),
        ([UPDATES[0], UPDATES[0]], r"client 0 must report once"),
    ],
)
def test_fedavg_raises_on_caller_bugs(updates: list[ClientUpdate], match: str) -> None:
    snapshot = clone_state(GLOBAL)
    with pytest.raises(AggregationError, match=match):
        FedAvg().aggregate(GLOBAL, updates, server_round=1)
    assert all(torch.equal(GLOBAL[k], snapshot[k]) for k in GLOBAL)


def test_check_updates_raises_for_strict_callers() -> None:
    check_updates(FedAvg(), GLOBAL, UPDATES)  # all good: no error
    with pytest.raises(AggregationError, match=r"FedAvg: client 1: key 'layer.bias' .*1 NaN"):
        check_updates(FedAvg(), GLOBAL, _with(1, state={"layer.bias": torch.tensor([math.nan, 0.0])}))


# ------------------------------------------------------------------------------------------------ state helpers
def test_state_helpers_copy_and_count_bytes() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    state = to_cpu_state(model)
    assert set(state) == set(model.state_dict())
    # linear 3·2 + 2 floats, BN weight, bias, running mean, var (4·2 floats) and one int64 counter
    assert state_nbytes(state) == (8 + 8) * 4 + 8
    state["0.weight"].add_(1.0)
    assert not torch.equal(state["0.weight"], model[0].weight.detach())
    assert not state["0.weight"].requires_grad
    copy = clone_state(state)
    copy["0.bias"].add_(1.0)
    assert not torch.equal(copy["0.bias"], state["0.bias"])


def test_client_update_is_frozen() -> None:
    with pytest.raises(AttributeError):
        UPDATES[0].num_examples = 5  # type: ignore[misc]
