"""Budget tiers: exact counts that sum to the clients, seeded assignment."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedcore.earlyexit.tiers import assign_exits, tier_counts


def test_counts_follow_the_shares_and_sum_to_the_clients() -> None:
    assert tier_counts(10, [0.3, 0.4, 0.3]) == [3, 4, 3]
    assert tier_counts(7, [0.3, 0.4, 0.3]) == [2, 3, 2]  # 2.1, 2.8, 2.1: the remainder goes to 2.8
    assert tier_counts(3, [0.5, 0.5]) == [2, 1]          # a tie goes to the first tier


@given(st.integers(1, 500), st.lists(st.integers(0, 20), min_size=1, max_size=5).filter(lambda w: sum(w) > 0))
def test_counts_always_sum_to_the_clients(num_clients: int, weights: list[int]) -> None:
    shares = [w / sum(weights) for w in weights]
    counts = tier_counts(num_clients, shares)
    assert sum(counts) == num_clients
    assert all(abs(c - s * num_clients) < 1 for c, s in zip(counts, shares, strict=True))


def test_assignment_is_seeded_and_matches_the_counts() -> None:
    tiers = [(0.3, 4), (0.4, 8), (0.3, 12)]
    a, b, c = assign_exits(10, tiers, 0), assign_exits(10, tiers, 0), assign_exits(10, tiers, 1)
    assert a == b and a != c
    assert sorted(a) == [4] * 3 + [8] * 4 + [12] * 3


def test_bad_tiers_fail() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        tier_counts(10, [0.5, 0.6])
    with pytest.raises(ValueError, match="depth"):
        assign_exits(10, [(1.0, 0)], 0)
