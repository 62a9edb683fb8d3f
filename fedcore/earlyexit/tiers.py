"""Compute-budget tiers: which exit depth each client can afford, assigned seeded per client.

Tiers are ``(share, depth)`` pairs, e.g. ``[(0.3, 4), (0.4, 8), (0.3, 12)]``: 30% of the clients may run 4 layers,
40% 8 and 30% all 12. :func:`assign_exits` turns the shares into exact client counts (largest remainder, so the
counts always sum to the number of clients) and deals them out in a seeded random order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from fedcore.registry import Registry


def tier_counts(num_clients: int, shares: Sequence[float]) -> list[int]:
    """Clients per tier: ``floor(share · K)`` each, the remainder to the largest fractional parts (ties: first).

    Raises
    ------
    ValueError
        If ``num_clients < 1``, a share is negative or not finite, or the shares do not sum to 1 (±1e-6).
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"tier_counts: 'num_clients' must be an int >= 1. Got {num_clients!r}.")
    if not shares or any(not math.isfinite(s) or s < 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"tier_counts: 'shares' must be non-negative and sum to 1. Got {list(shares)!r}.")
    exact = [s * num_clients for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: num_clients - sum(counts)]:
        counts[i] += 1
    return counts


def assign_exits(num_clients: int, tiers: Sequence[tuple[float, int]], seed: int) -> list[int]:
    """Exit depth of every client (index = client id): tier counts from :func:`tier_counts`, seeded order.

    Raises
    ------
    ValueError
        On bad shares (see :func:`tier_counts`) or a depth that is not an int >= 1.
    """
    for share, depth in tiers:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"assign_exits: every tier's depth must be an int >= 1. Got {depth!r} "
                             f"(share {share!r}).")
    counts = tier_counts(num_clients, [share for share, _ in tiers])
    depths = np.repeat([depth for _, depth in tiers], counts)
    order = np.random.default_rng(seed).permutation(num_clients)
    exits = np.empty(num_clients, dtype=np.int64)
    exits[order] = depths
    return [int(d) for d in exits]


#: How deep a client of a tier trains: ``plan(tier_depth, full_depth) -> depth``, or None (the client sits out).
EXIT_PLANS: Registry[Callable[[int, int], int | None]] = Registry("exit_plan")
EXIT_PLANS.register("early_exit")(lambda: lambda tier, full: tier)     # each client as deep as its budget allows
EXIT_PLANS.register("full")(lambda: lambda tier, full: full)           # every client the whole model (stragglers)
EXIT_PLANS.register("drop_weak")(lambda: lambda tier, full: full if tier == full else None)  # only full budgets
