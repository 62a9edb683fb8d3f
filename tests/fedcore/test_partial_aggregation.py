"""One partial aggregation (fedcore.aggregation.partial): groups over their holders, weights, screening."""

from __future__ import annotations

import pytest
import torch

from fedcore.aggregation import AGGREGATORS, ClientUpdate
from fedcore.aggregation.partial import aggregate_partial
from fedcore.errors import AggregationError, QuorumError

GLOBAL = {"audio.w": torch.zeros(3), "audio.b": torch.zeros(1), "visual.w": torch.zeros(2),
          "fusion.steps": torch.tensor(0)}


def group(key: str) -> str:
    return key.split(".")[0]


def update(client: int, n: int, groups: tuple[str, ...], value: float, weight: float | None = None) -> ClientUpdate:
    state = {k: torch.full_like(v, value) if v.is_floating_point() else torch.tensor(int(value))
             for k, v in GLOBAL.items() if group(k) in groups}
    return ClientUpdate(client, state, n, {"train_loss": 1.0}, weight=weight)


def test_each_group_is_the_weighted_mean_of_its_holders_and_an_unsent_group_keeps_its_value() -> None:
    updates = [update(0, 10, ("audio",), 1.0), update(1, 30, ("audio", "visual"), 3.0)]
    result = aggregate_partial(AGGREGATORS.build("fedavg"), GLOBAL, updates, 1, group_of=group)
    assert torch.allclose(result.state["audio.w"], torch.full((3,), (10 * 1.0 + 30 * 3.0) / 40))  # 2.5
    assert torch.equal(result.state["visual.w"], torch.full((2,), 3.0))  # client 1 alone
    assert torch.equal(result.state["fusion.steps"], GLOBAL["fusion.steps"])  # nobody sent it
    assert result.participants == {"audio": [0, 1], "visual": [1]}
    assert result.state.keys() == GLOBAL.keys()


def test_a_weight_per_group_replaces_the_example_count() -> None:
    """Depth-aware style: ω = n · l / d for a layer-l entry of a client with exit depth d."""
    depth = {0: 2, 1: 1}
    layer = {"audio": 1, "visual": 2}
    updates = [update(0, 10, ("audio", "visual"), 1.0), update(1, 30, ("audio",), 5.0)]
    result = aggregate_partial(AGGREGATORS.build("fedavg"), GLOBAL, updates, 1, group_of=group,
                               weight_of=lambda u, g: u.num_examples * layer.get(g, 1) / depth[u.client_id])
    # audio (l = 1): client 0 weighs 10·1/2 = 5, client 1 weighs 30·1/1 = 30 -> (5·1 + 30·5) / 35
    assert torch.allclose(result.state["audio.w"], torch.full((3,), 155 / 35))
    assert torch.equal(result.state["visual.w"], torch.full((2,), 1.0))


def test_a_non_finite_update_is_rejected_from_every_group_and_the_round_goes_on() -> None:
    bad = update(2, 10, ("audio", "visual"), float("nan"))
    updates = [update(0, 10, ("audio",), 1.0), update(1, 10, ("audio", "visual"), 3.0), bad]
    result = aggregate_partial(AGGREGATORS.build("fedavg"), GLOBAL, updates, 1, group_of=group)
    assert set(result.rejected) == {2} and "must hold finite values" in result.rejected[2]
    assert torch.equal(result.state["visual.w"], torch.full((2,), 3.0))
    assert torch.isfinite(result.state["audio.w"]).all()
    assert 2 in result.flagged


def test_part_of_a_group_without_the_rest_is_rejected() -> None:
    torn = ClientUpdate(1, {"audio.w": torch.ones(3)}, 10, {})
    result = aggregate_partial(AGGREGATORS.build("fedavg"), GLOBAL, [update(0, 10, ("audio",), 1.0), torn], 1,
                               group_of=group)
    assert "must send all of a group" in result.rejected[1]
    assert torch.equal(result.state["audio.w"], torch.ones(3))


def test_below_the_quorum_nothing_is_applied() -> None:
    updates = [update(0, 10, ("audio",), float("inf")), update(1, 10, ("audio",), 1.0)]
    with pytest.raises(QuorumError, match="at least 2"):
        aggregate_partial(AGGREGATORS.build("fedavg"), GLOBAL, updates, 1, group_of=group, min_accepted=2)


def test_a_caller_check_rejects_with_its_reason() -> None:
    updates = [update(0, 10, ("audio",), 1.0), update(1, 10, ("audio", "visual"), 3.0)]
    result = aggregate_partial(AGGREGATORS.build("fedavg"), GLOBAL, updates, 1, group_of=group,
                               also=lambda u: "beyond its exit" if "visual.w" in u.state else None)
    assert result.rejected == {1: "client 1: beyond its exit"}
    assert torch.equal(result.state["visual.w"], GLOBAL["visual.w"])


def test_a_stateful_rule_keeps_moments_for_every_group_it_saw() -> None:
    rule = AGGREGATORS.build("fedadam")
    aggregate_partial(rule, GLOBAL, [update(0, 10, ("audio",), 1.0), update(1, 10, ("visual",), 2.0)], 1,
                      group_of=group)
    assert {k[2:] for k in rule.state_dict() if k.startswith("m/")} == {"audio.w", "audio.b", "visual.w"}


def test_a_robust_rule_runs_per_group() -> None:
    updates = [update(c, 10, ("audio",), v) for c, v in enumerate((1.0, 1.1, 100.0))]
    result = aggregate_partial(AGGREGATORS.build("median"), GLOBAL, updates, 1, group_of=group)
    assert torch.allclose(result.state["audio.w"], torch.full((3,), 1.1))


def test_a_weight_that_is_not_positive_is_a_caller_bug() -> None:
    with pytest.raises(AggregationError, match="'weight' must be a finite float > 0"):
        aggregate_partial(AGGREGATORS.build("fedavg"), GLOBAL, [update(0, 10, ("audio",), 1.0, weight=0.0)], 1,
                          group_of=group)
