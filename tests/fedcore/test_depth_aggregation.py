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


# ------------------------------------------------------------------------------------------------ exit norms
def exit_of(key: str) -> int:
    return int(key.split(".")[1]) if key.startswith(("exits.", "exit_norms.")) else 0


NORM_KEYS = (*KEYS, "norm.w", "exit_norms.1.w", "exit_norms.2.w", "exit_norms.3.w")


def _norm_client(client: int, n: int, depth: int, base: float) -> ClientUpdate:
    """Layers 1..depth, the head and own norm of exit ``depth`` (per_exit) and the shared final norm."""
    update = _client(client, n, depth, base)
    return ClientUpdate(client, {**update.state, f"exit_norms.{depth}.w": torch.full((2,), base + 50),
                                 "norm.w": torch.full((2,), base + 70)}, n, {})


@pytest.mark.parametrize("weighting", ["uniform", "depth"])
def test_an_exit_norm_is_averaged_over_the_clients_that_reach_its_exit_only(weighting: str) -> None:
    # client 0: depth 1, n=2; client 1: depth 2, n=1; client 2: depth 2, n=3 (nobody reaches exit 3)
    updates = [_norm_client(0, 2, 1, 10.0), _norm_client(1, 1, 2, 20.0), _norm_client(2, 3, 2, 30.0)]
    global_state = {k: torch.full((2,), -5.0) for k in NORM_KEYS}
    result = depth_aware(FEDAVG, global_state, updates, {0: 1, 1: 2, 2: 2}, layer_of, weighting, exit_of=exit_of)
    expect = {
        "exit_norms.1.w": 60.0,                        # client 0 alone
        "exit_norms.2.w": (1 * 70 + 3 * 80) / 4,       # the depth-2 clients, by n_c (no g: part of the exit)
        "exit_norms.3.w": -5.0,                        # nobody reached exit 3: kept
        "norm.w": (2 * 80 + 1 * 90 + 3 * 100) / 6,     # a shared norm: every client, whatever its depth
    }
    for key, value in expect.items():
        assert torch.allclose(result.state[key], torch.full((2,), value)), key
    assert result.participants["exit_norms.2.w"] == [1, 2] and "exit_norms.3.w" not in result.participants


def test_a_client_sending_a_deeper_exit_is_rejected_when_exits_are_known() -> None:
    updates = [_norm_client(0, 2, 1, 10.0), _norm_client(1, 1, 2, 20.0)]
    bad = ClientUpdate(0, {**updates[0].state, "exit_norms.2.w": torch.zeros(2)}, 2, {})
    global_state = {k: torch.full((2,), -5.0) for k in NORM_KEYS}
    result = depth_aware(FEDAVG, global_state, [bad, updates[1]], {0: 1, 1: 2}, layer_of, exit_of=exit_of)
    assert list(result.rejected) == [0] and "deeper exits ['exit_norms.2.w']" in result.rejected[0]
    assert torch.equal(result.state["exit_norms.2.w"], torch.full((2,), 70.0))
    # without exit_of nothing checks exits (the behaviour before exit norms)
    assert depth_aware(FEDAVG, global_state, [bad, updates[1]], {0: 1, 1: 2}, layer_of).rejected == {}


@pytest.mark.parametrize("exit_norm", ["per_exit", "shared"])
def test_trained_early_exit_clients_aggregate_their_norms_by_the_exits_they_reach(exit_norm: str) -> None:
    """Three real clients (depths 1, 2, 2 of exits 1/2/3): the aggregated norms, computed by hand from the updates."""
    from fedcore.algorithms.base import ClientData, LocalSettings
    from fedcore.config import ModelConfig
    from fedcore.earlyexit.models import build_exit_model
    from fedcore.earlyexit.train import train_exit_client

    shape = (1, 8, 12)
    model = build_exit_model("logmel_transformer", input_shape=shape, cfg=ModelConfig(name="transformer", width=8,
                             depth=3), options={}, exits=(1, 2, 3), num_classes=3, head="linear",
                             generator=torch.Generator().manual_seed(0), exit_norm=exit_norm)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    settings = LocalSettings(epochs=1, batch_size=4, lr=0.1, momentum=0.0, weight_decay=0.0)
    depths, sizes = {0: 1, 1: 2, 2: 2}, {0: 4, 1: 8, 2: 12}
    updates = []
    for client, depth in depths.items():
        g = torch.Generator().manual_seed(client)
        data = ClientData(torch.randn(sizes[client], *shape, generator=g), torch.randint(0, 3, (sizes[client],),
                                                                                          generator=g))
        updates.append(train_exit_client(client_id=client, model=model, global_state=start, data=data, depth=depth,
                                         settings=settings, generator=g))
    result = depth_aware(FEDAVG, start, updates, depths, model.layer_of, "depth", exit_of=model.exit_of)
    assert result.rejected == {}

    def mean(key: str, clients: list[int]) -> torch.Tensor:
        total = sum(sizes[c] for c in clients)
        return sum((sizes[c] / total) * updates[c].state[key] for c in clients)  # type: ignore[return-value]

    if exit_norm == "per_exit":
        assert torch.allclose(result.state["exit_norms.1.weight"], updates[0].state["exit_norms.1.weight"])
        assert torch.allclose(result.state["exit_norms.2.weight"], mean("exit_norms.2.weight", [1, 2]))
        assert torch.equal(result.state["exit_norms.3.weight"], start["exit_norms.3.weight"])  # nobody reached 3
        assert result.participants["exit_norms.2.bias"] == [1, 2]
        assert not any(k.startswith("backbone.net.norm.") for k in result.state)
    else:  # the shared norm: averaged over every client by n_c, the depth-1 client included
        assert torch.allclose(result.state["backbone.net.norm.weight"], mean("backbone.net.norm.weight", [0, 1, 2]))
        assert result.participants["backbone.net.norm.weight"] == [0, 1, 2]
