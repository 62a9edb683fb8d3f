"""FedAvg server step (McMahan et al., AISTATS 2017, arXiv:1602.05629, Alg. 1).

    w_{t+1} = Σ_k (n_k / n) · w^k_{t+1},   n = Σ_k n_k over the clients k that reported in round t+1.

Applied to every entry of the state dict, buffers included (BatchNorm running mean and variance), as in the
reference benchmark; the paper averages the model parameters only.

Numerics (stated rules, not in the paper):

- Floating tensors are averaged in float64 and cast back to their dtype.
- Integer (and bool) tensors, e.g. BatchNorm's ``num_batches_tracked``, get the same weighted mean, rounded to
  the nearest integer (ties to even, :func:`torch.round`), then cast back to their dtype (every rule does this).
- The weights n_k / n are computed once as Python floats and the terms are summed in increasing ``client_id``
  order, so the result does not depend on the order in which updates arrive (bit for bit), and multiplying every
  n_k by the same integer leaves it unchanged (n_k / n is the correctly rounded value of the same fraction).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedcore.aggregation.base import (
    AGGREGATORS,
    Aggregator,
    ClientUpdate,
    Combination,
    combine_weighted,
    integer_average,
    nominal_weights,
)
from fedcore.aggregation.state import StateDict


def weighted_average(global_state: StateDict, updates: Sequence[ClientUpdate]) -> StateDict:
    """Σ_k (n_k / n) · w^k for every key of ``global_state``, cast to the global dtypes (no screening).

    Parameters
    ----------
    global_state : dict of str to Tensor
        Gives the keys, and the dtype and device of each output tensor.
    updates : sequence of ClientUpdate
        Screened updates (see :meth:`Aggregator.screen`); not modified.

    Returns
    -------
    dict of str to Tensor
        New tensors, sharing no memory with the inputs.
    """
    ordered = sorted(updates, key=lambda u: u.client_id)
    weights = nominal_weights(ordered, count_weighted=True)
    floats = combine_weighted(global_state, ordered, [weights[u.client_id] for u in ordered])
    merged = {**floats, **integer_average(global_state, ordered)}
    return {key: merged[key].to(device=ref.device, dtype=ref.dtype) for key, ref in global_state.items()}


@AGGREGATORS.register("fedavg")
class FedAvg(Aggregator):
    """Weighted mean of the client states by number of local examples (McMahan et al. 2017, Alg. 1).

    Stateless: the result depends only on the updates of the round (``global_state`` gives keys, dtypes and
    devices). See the module docstring for the numerics. Flags nobody (every client keeps its nominal weight).
    """

    count_weighted = True

    def combine(self, global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int) -> Combination:
        """w_{t+1} = Σ_k (n_k / n) · w^k_{t+1}."""
        weights = nominal_weights(updates, count_weighted=True)
        state = combine_weighted(global_state, updates, [weights[u.client_id] for u in updates])
        return Combination(state=state, weights=weights)
