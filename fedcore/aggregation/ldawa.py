"""L-DAWA: layer-wise divergence-aware weight aggregation (Rehman et al., ICCV 2023, arXiv:2307.07393).

For every layer (state-dict entry) l, with w_g the previous global state:

    δ_k^l = min(1, ⟨w_k^l, w_g^l⟩ / (‖w_k^l‖ ‖w_g^l‖)),       w^l_{t+1} = (1/K) Σ_k δ_k^l · w_k^l.

As in the reference code (``L-DAWA-Agg.py``, PAPERS.md §4): the mean is uniform over the K clients, 0-d entries
and entries whose norm is 0 on either side are averaged unscaled (δ = 1), and FedAvg is used for the first
``ldawa_warmup_rounds`` rounds (the code uses 2). The result is not a convex combination: δ < 1 shrinks a layer.

Detection: a client's effective weight is mean_l δ_k^l / K; it is flagged when the mean cosine is below
``flag_ratio``. (Cosines of the weights, not of the updates, are near 1 for most attacks; the rule is a
stabiliser for SSL, not a Byzantine defence.)
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
    nominal_weights,
)
from fedcore.aggregation.state import StateDict


def layer_cosine(client: torch.Tensor, reference: torch.Tensor) -> float:
    """min(1, cos(client, reference)) in float64; 1 for 0-d entries and for a zero norm on either side."""
    if client.ndim == 0:
        return 1.0
    a = client.detach().to("cpu", torch.float64).reshape(-1)
    b = reference.detach().to("cpu", torch.float64).reshape(-1)
    norms = float(torch.linalg.vector_norm(a)) * float(torch.linalg.vector_norm(b))
    if norms == 0.0:
        return 1.0
    return min(1.0, float(torch.dot(a, b)) / norms)


@AGGREGATORS.register("ldawa")
class LDAWA(Aggregator):
    """Per-layer cosine-scaled uniform mean, after ``ldawa_warmup_rounds`` rounds of FedAvg.

    Parameters
    ----------
    ldawa_warmup_rounds : int
        Rounds 1..this use FedAvg (reference code: 2).
    flag_ratio : float
        See :class:`~fedcore.aggregation.base.Aggregator`.
    """

    def __init__(self, *, ldawa_warmup_rounds: int = 2, flag_ratio: float = 0.5) -> None:
        super().__init__(flag_ratio=flag_ratio)
        if isinstance(ldawa_warmup_rounds, bool) or not isinstance(ldawa_warmup_rounds, int) \
                or ldawa_warmup_rounds < 0:
            raise ValueError(f"LDAWA: 'ldawa_warmup_rounds' must be an int >= 0. Got {ldawa_warmup_rounds!r}.")
        self.ldawa_warmup_rounds = ldawa_warmup_rounds

    def combine(self, global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int) -> Combination:
        """w^l = (1/K) Σ_k δ_k^l w_k^l (FedAvg during warm-up)."""
        if server_round <= self.ldawa_warmup_rounds:
            counts = nominal_weights(updates, count_weighted=True)
            warmup = combine_weighted(global_state, updates, [counts[u.client_id] for u in updates])
            return Combination(state=warmup, weights=counts, nominal=counts)
        keys = floating_keys(global_state)
        size = len(updates)
        state: StateDict = {}
        cosine_sum = dict.fromkeys((u.client_id for u in updates), 0.0)
        for key in keys:
            deltas = [layer_cosine(u.state[key], global_state[key]) for u in updates]
            state.update(combine_weighted(global_state, updates, [d / size for d in deltas], keys=[key]))
            for update, delta in zip(updates, deltas, strict=True):
                cosine_sum[update.client_id] += delta
        weights = {client: total / len(keys) / size if keys else 1.0 / size for client, total in cosine_sum.items()}
        return Combination(state=state, weights=weights)
