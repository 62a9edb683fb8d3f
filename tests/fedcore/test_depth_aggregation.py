"""Depth-aware partial aggregation of early-exit clients: a hand-made 3-client case, both depth weightings."""

from __future__ import annotations

import pytest
import torch

from fedcore.aggregation import AGGREGATORS
from fedcore.aggregation.base import ClientUpdate
from fedcore.earlyexit.aggregate import depth_aware
from fedcore.errors import AggregationError, QuorumError

FEDAVG = AGGREGATORS.build("fedavg")
KEYS = ("embed.w", "blocks.0.w", "blocks.1.w", "blocks.2.w", "exits.1.w", "exits.2.w", "exits.3.w")


def layer_of(key: str) -> int:
    return int(key.split(".")[1]) + 1 if key.startswith("blocks.") else 0


def _global() -> dict[str, torch.Tensor]:
    return {k: torch.full((2,), -5.0) for k in KEYS}


def _client(client: int, n: int, depth: int, base: float) -> ClientUpdate:
    keys = ["embed.w", *[f"blocks.{i}.w" for i in range(depth)], f"exits.{depth}.w"]
    return ClientUpdate(client, {k: torch.full((2,), base + i) for i, k in enumerate(keys)}, n, {})


def _case() -> tuple[list[ClientUpdate], dict[int, int]]:
    # client 0: depth 1, n=2; client 1: depth 2, n=1; client 2: depth 2, n=3 (nobody reaches layer 3)
    return [_client(0, 2, 1, 10.0), _client(1, 1, 2, 20.0), _client(2, 3, 2, 30.0)], {0: 1, 1: 2, 2: 2}


def test_uniform_weighting_matches_a_hand_computation() -> None:
    updates, depths = _case()
    result = depth_aware(FEDAVG, _global(), updates, depths, layer_of, "uniform")
    expect = {
        "embed.w": (2 * 10 + 1 * 20 + 3 * 30) / 6,
        "blocks.0.w": (2 * 11 + 1 * 21 + 3 * 31) / 6,
        "blocks.1.w": (1 * 22 + 3 * 32) / 4,          # only the depth-2 clients
        "exits.1.w": 12.0,                            # client 0's head alone
        "exits.2.w": (1 * 23 + 3 * 33) / 4,
    }
    assert set(result.participants) == set(expect)
    for key, value in expect.items():
        assert torch.allclose(result.state[key], torch.full((2,), value)), key
    full = result.state
    assert torch.equal(full["blocks.2.w"], torch.full((2,), -5.0))  # no client reached layer 3
    assert torch.equal(full["exits.3.w"], torch.full((2,), -5.0))
    assert result.participants["blocks.1.w"] == [1, 2]


def test_depth_weighting_scales_each_layer_by_l_over_d() -> None:
    updates, depths = _case()
    result = depth_aware(FEDAVG, _global(), updates, depths, layer_of, "depth")
    # layer 1: weights n·(1/d): client 0: 2·1, client 1: 1·(1/2), client 2: 3·(1/2)
    w = [2.0, 0.5, 1.5]
    assert torch.allclose(result.state["blocks.0.w"], torch.full((2,), (w[0] * 11 + w[1] * 21 + w[2] * 31) / 4.0))
    # layer 2: g = 2/2 = 1 for both depth-2 clients: the same as uniform
    assert torch.allclose(result.state["blocks.1.w"], torch.full((2,), (22 + 3 * 32) / 4))
    # outside the layers g is not applied
    assert torch.allclose(result.state["embed.w"], torch.full((2,), (2 * 10 + 20 + 3 * 30) / 6))


def test_a_client_beyond_its_exit_or_with_a_bad_update_is_rejected_and_a_depth_is_required() -> None:
    updates, depths = _case()
    result = depth_aware(FEDAVG, _global(), updates, {**depths, 1: 1}, layer_of)
    assert list(result.rejected) == [1] and "deeper layers ['blocks.1.w']" in result.rejected[1]
    assert result.participants["blocks.1.w"] == [2]
    nan = ClientUpdate(2, {**updates[2].state, "blocks.1.w": torch.tensor([1.0, float("nan")])}, 3, {})
    result = depth_aware(FEDAVG, _global(), [*updates[:2], nan], depths, layer_of, server_round=4,
                         failed={5: "training raised ValueError: bad batch"})
    assert sorted(result.rejected) == [2, 5] and "finite" in result.rejected[2]
    assert torch.equal(result.state["blocks.1.w"], torch.full((2,), 22.0))  # client 1 alone: no NaN in the mean
    with pytest.raises(QuorumError, match=r"round 4 needs at least 3 accepted updates .*client 2.*client 5"):
        depth_aware(FEDAVG, _global(), [*updates[:2], nan], depths, layer_of, server_round=4,
                    failed={5: "training raised ValueError: bad batch"}, min_accepted=3)
    with pytest.raises(AggregationError, match="exit depth"):
        depth_aware(FEDAVG, _global(), updates, {0: 1, 1: 2}, layer_of)
    with pytest.raises(ValueError, match="depth_weight"):
        depth_aware(FEDAVG, _global(), updates, depths, layer_of, "nope")


def test_fedavg_server_keeps_the_average_and_fedadam_steps_only_reached_entries() -> None:
    updates, depths = _case()
    global_state = _global()
    result = depth_aware(FEDAVG, global_state, updates, depths, layer_of)
    averaged = {k: result.state[k] for k in result.participants}
    adam = AGGREGATORS.build("fedadam")
    stepped = depth_aware(adam, global_state, updates, depths, layer_of).state
    assert torch.equal(stepped["blocks.2.w"], global_state["blocks.2.w"])
    moved = stepped["blocks.1.w"] - global_state["blocks.1.w"]
    assert bool((moved > 0).all()) and not torch.allclose(stepped["blocks.1.w"], averaged["blocks.1.w"])
    assert {k[2:] for k in adam.state_dict() if k.startswith("m/")} == set(averaged)  # no moments for layer 3
