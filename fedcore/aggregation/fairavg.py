"""FairAvg: the unweighted mean of the client states (FASSL's "FairAvg"; PAPERS.md §4 [A]).

    w_{t+1} = (1/K) Σ_k w^k_{t+1}

FASSL (Rehman et al., arXiv:2402.02889) compares a "FairAvg" rule whose definition is not in the accessible text;
we take the most likely reading, the uniform mean over the K clients of the round, which gives every client the
same say whatever its data size. Terms are summed in increasing ``client_id`` order in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedcore.aggregation.base import (
    AGGREGATORS,
    Aggregator,
    ClientUpdate,
    Combination,
    combine_weighted,
    nominal_weights,
)
from fedcore.aggregation.state import StateDict


@AGGREGATORS.register("fairavg")
class FairAvg(Aggregator):
    """Uniform mean of the client states; stateless; flags nobody."""

    def combine(self, global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int) -> Combination:
        """w_{t+1} = (1/K) Σ_k w^k_{t+1}."""
        weights = nominal_weights(updates, count_weighted=False)
        state = combine_weighted(global_state, updates, [weights[u.client_id] for u in updates])
        return Combination(state=state, weights=weights)
