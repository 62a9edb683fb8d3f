"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017, "Machine learning with adversaries").

With K client states flattened over the floating entries and f the number of Byzantine clients tolerated
(requires K > 2f + 2), the score of client k is the sum of its squared distances to its K − f − 2 nearest
neighbours:

    s(k) = Σ_{j ∈ N_k} ‖w^k − w^j‖²,   |N_k| = K − f − 2.

Krum returns the state of the client with the lowest score; Multi-Krum selects the m lowest-scoring clients and
returns their uniform mean (m = K − f by default). Ties are broken by client id. ``krum_f`` = None takes the
largest f the rule tolerates, ⌊(K − 3)/2⌋. Unselected clients get weight 0 and are flagged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedcore.aggregation.base import (
    AGGREGATORS,
    Aggregator,
    ClientUpdate,
    Combination,
    combine_weighted,
    floating_keys,
    stacked,
)
from fedcore.aggregation.state import StateDict
from fedcore.errors import AggregationError


def pairwise_sq_distances(global_state: StateDict, updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """``(K, K)`` float64 matrix of squared Euclidean distances between the flattened floating states."""
    size = len(updates)
    distances = torch.zeros(size, size, dtype=torch.float64)
    for key in floating_keys(global_state):
        matrix = stacked(updates, key)
        distances += torch.cdist(matrix, matrix).square()
    return distances


def krum_scores(distances: torch.Tensor, byzantine: int) -> list[float]:
    """Krum score of every row: the sum of its K − f − 2 smallest distances to the others."""
    size = distances.shape[0]
    neighbours = size - byzantine - 2
    scores = []
    for row in range(size):
        others = torch.cat([distances[row, :row], distances[row, row + 1:]])
        scores.append(float(torch.sort(others).values[:neighbours].sum()))
    return scores


class _KrumBase(Aggregator):
    def __init__(self, *, krum_f: int | None = None, flag_ratio: float = 0.5) -> None:
        super().__init__(flag_ratio=flag_ratio)
        if krum_f is not None and (isinstance(krum_f, bool) or not isinstance(krum_f, int) or krum_f < 0):
            raise ValueError(f"{type(self).__name__}: 'krum_f' must be None or an int >= 0. Got {krum_f!r}.")
        self.krum_f = krum_f

    def byzantine(self, size: int) -> int:
        """F for a round of ``size`` clients; raises AggregationError unless size > 2f + 2."""
        f = max((size - 3) // 2, 0) if self.krum_f is None else self.krum_f
        if size <= 2 * f + 2:
            raise AggregationError(f"{type(self).__name__}: needs more than 2f + 2 = {2 * f + 2} accepted updates "
                                   f"(f = {f}). Got {size}. Sample more clients or lower 'krum_f'.")
        return f

    def select(self, global_state: StateDict, updates: Sequence[ClientUpdate], count: int) -> list[int]:
        """Indices (into ``updates``) of the ``count`` lowest Krum scores, ties by client id."""
        f = self.byzantine(len(updates))
        scores = krum_scores(pairwise_sq_distances(global_state, updates), f)
        order = sorted(range(len(updates)), key=lambda i: (scores[i], updates[i].client_id))
        return sorted(order[:count])

    def selected_mean(
        self, global_state: StateDict, updates: Sequence[ClientUpdate], chosen: list[int]
    ) -> Combination:
        """Uniform mean of the ``chosen`` updates (indices); the others get weight 0."""
        weights = [1.0 / len(chosen) if i in chosen else 0.0 for i in range(len(updates))]
        state = combine_weighted(global_state, updates, weights)
        return Combination(state=state, weights={u.client_id: w for u, w in zip(updates, weights, strict=True)})


@AGGREGATORS.register("krum")
class Krum(_KrumBase):
    """The single client state with the lowest Krum score.

    Parameters
    ----------
    krum_f : int or None
        f, Byzantine clients tolerated; None: ⌊(K − 3)/2⌋.
    flag_ratio : float
        See :class:`~fedcore.aggregation.base.Aggregator`.
    """

    def combine(self, global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int) -> Combination:
        """w_{t+1} = w^{k*}, k* = argmin_k s(k)."""
        return self.selected_mean(global_state, updates, self.select(global_state, updates, 1))


@AGGREGATORS.register("multikrum")
class MultiKrum(_KrumBase):
    """Uniform mean of the m client states with the lowest Krum scores.

    Parameters
    ----------
    krum_f : int or None
        f, Byzantine clients tolerated; None: ⌊(K − 3)/2⌋.
    multikrum_m : int or None
        m, clients averaged; None: K − f. Capped at K.
    flag_ratio : float
        See :class:`~fedcore.aggregation.base.Aggregator`.
    """

    def __init__(self, *, krum_f: int | None = None, multikrum_m: int | None = None, flag_ratio: float = 0.5) -> None:
        super().__init__(krum_f=krum_f, flag_ratio=flag_ratio)
        if multikrum_m is not None and (isinstance(multikrum_m, bool) or not isinstance(multikrum_m, int)
                                        or multikrum_m < 1):
            raise ValueError(f"MultiKrum: 'multikrum_m' must be None or an int >= 1. Got {multikrum_m!r}.")
        self.multikrum_m = multikrum_m

    def combine(self, global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int) -> Combination:
        """w_{t+1} = (1/m) Σ_{k ∈ M} w^k, M the m lowest scores."""
        size = len(updates)
        count = size - self.byzantine(size) if self.multikrum_m is None else min(self.multikrum_m, size)
        return self.selected_mean(global_state, updates, self.select(global_state, updates, count))
