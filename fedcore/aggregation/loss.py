"""Loss-based aggregation (FedVSSL, Zhuang et al., ECCV 2022, arXiv:2207.01975; used by FASSL).

Each client reports its mean local training loss L̄_k (metric ``train_loss``); the server weights it by
s_k = exp(−L̄_k):

    w_Loss = Σ_k s_k w^k / Σ_k s_k,      w_{t+1} = γ · w_FedAvg + (1 − γ) · w_Loss,

with w_FedAvg = Σ_k (n_k/n) w^k. γ = 0 (default) is the pure loss-based rule; FedVSSL mixes with γ = 0.2. The
reference strategy code concatenates the two weight lists with ``+`` instead of adding them (PAPERS.md §4); this
implementation adds them, as the paper's equation says. exp(−L̄_k) is computed as exp(−(L̄_k − min_j L̄_j)), which
is the same after normalisation and cannot underflow to 0/0.

A client lies about its loss at no cost, so the rule is not a defence; clients whose weight falls below
``flag_ratio``/K are flagged (down-weighted).
"""

from __future__ import annotations

import math
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


@AGGREGATORS.register("loss")
class LossWeighted(Aggregator):
    """exp(−loss)-weighted mean, optionally mixed with FedAvg by γ (``loss_gamma``).

    Parameters
    ----------
    loss_gamma : float
        γ in [0, 1], the FedAvg share of the mix. 0 (default): pure loss weighting; FedVSSL uses 0.2.
    flag_ratio : float
        See :class:`~fedcore.aggregation.base.Aggregator`.
    """

    required_metrics = ("train_loss",)

    def __init__(self, *, loss_gamma: float = 0.0, flag_ratio: float = 0.5) -> None:
        super().__init__(flag_ratio=flag_ratio)
        if not 0.0 <= loss_gamma <= 1.0:
            raise ValueError(f"LossWeighted: 'loss_gamma' must be in [0, 1]. Got {loss_gamma!r}.")
        self.loss_gamma = loss_gamma

    def combine(self, global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int) -> Combination:
        """w_{t+1} = γ Σ (n_k/n) w^k + (1 − γ) Σ s_k w^k / Σ s_k."""
        losses = [float(u.metrics["train_loss"]) for u in updates]
        lowest = min(losses)
        scores = [math.exp(-(loss - lowest)) for loss in losses]
        total = sum(scores)
        counts = nominal_weights(updates, count_weighted=True)
        gamma = self.loss_gamma
        weights = {u.client_id: gamma * counts[u.client_id] + (1.0 - gamma) * s / total
                   for u, s in zip(updates, scores, strict=True)}
        state = combine_weighted(global_state, updates, [weights[u.client_id] for u in updates])
        return Combination(state=state, weights=weights)
