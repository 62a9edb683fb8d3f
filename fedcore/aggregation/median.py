"""Coordinate-wise median (Yin et al., ICML 2018, arXiv:1803.01498, "Byzantine-robust distributed learning").

    w_{t+1}[i] = median_k w^k_{t+1}[i]   for every coordinate i of every floating entry,

with the mean of the two middle values when K is even. Unweighted. Detection: a client's effective weight is the
share of the result it contributed to (1/#middle values at each coordinate it is a middle value of), averaged over
coordinates; a client that is never near the middle (an outlier) gets weight about 0 and is flagged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedcore.aggregation.base import AGGREGATORS, Aggregator, ClientUpdate, Combination, floating_keys, stacked
from fedcore.aggregation.state import StateDict


def coordinate_median(matrix: torch.Tensor) -> torch.Tensor:
    """Median of each column of ``matrix`` ``(K, m)``; the mean of the two middle values when K is even."""
    ordered, _ = torch.sort(matrix, dim=0)
    size = matrix.shape[0]
    if size % 2 == 1:
        return ordered[size // 2].clone()
    return (ordered[size // 2 - 1] + ordered[size // 2]) / 2


def trimmed_combination(
    global_state: StateDict, updates: Sequence[ClientUpdate], low: int, high: int
) -> Combination:
    """Mean of the sorted values ranked ``low`` .. ``high - 1`` at every coordinate, with each client's share.

    Ties are broken by client id (stable sort), so the result and the shares do not depend on the input order.
    """
    size = len(updates)
    keys = floating_keys(global_state)
    share = torch.zeros(size, dtype=torch.float64)
    coordinates = 0
    state: StateDict = {}
    used = high - low
    for key in keys:
        matrix = stacked(updates, key)
        ordered, rank = torch.sort(matrix, dim=0, stable=True)
        state[key] = ordered[low:high].mean(dim=0).reshape(global_state[key].shape)
        chosen = rank[low:high].reshape(-1)
        share += torch.bincount(chosen, minlength=size).to(torch.float64) / used
        coordinates += matrix.shape[1]
    share /= max(coordinates, 1)
    return Combination(state=state, weights={u.client_id: float(share[i]) for i, u in enumerate(updates)})


@AGGREGATORS.register("median")
class CoordinateMedian(Aggregator):
    """Coordinate-wise median of the client states; stateless."""

    def combine(self, global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int) -> Combination:
        """w[i] = median_k w^k[i]."""
        size = len(updates)
        low = (size - 1) // 2
        return trimmed_combination(global_state, updates, low, size - low)
