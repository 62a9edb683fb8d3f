"""Loss-based aggregation (FedVSSL, Zhuang et al., ECCV 2022, arXiv:2207.01975; used by FASSL).

Each client reports its mean local training loss L̄_k (metric ``train_loss``); the server weights it by a score
s_k (PAPERS.md §4):

    w_Loss = Σ_k s_k w^k / Σ_k s_k,      w_{t+1} = γ · w_FedAvg + (1 − γ) · w_Loss,

with w_FedAvg = Σ_k (n_k/n) w^k. γ = 0 (default) is the pure loss-based rule; FedVSSL mixes with γ = 0.2. The
reference strategy code concatenates the two weight lists with ``+`` instead of adding them (PAPERS.md §4); this
implementation adds them, as the paper's equation says.

**The score.** The paper's s_k = exp(−L̄_k) is not scale-free: the weights depend on the loss's units. FedVSSL's
losses are of order 1; Barlow Twins' summed loss is ≈ 50 and differs between clients by a few units, so one client
takes most of the weight (0.76–0.91 per round, issue 21) and the run is that client's training; ACOP's loss is
≈ 1.8 and alike across clients, so every weight is ≈ 1/K and the rule is an unweighted mean. Two scales
(``loss_scale``), with a temperature τ (``loss_temperature``, default 1):

    relative (default, [A]):  s_k = exp(−(L̄_k − min_j L̄_j) / (τ · m)),   m = (1/K) Σ_j |L̄_j|
    raw (the paper's):        s_k = exp(−(L̄_k − min_j L̄_j) / τ)

Subtracting min_j L̄_j changes nothing after normalisation (it divides every s_k by the same exp(−min_j L̄_j)) and
keeps the best client's score at 1, so Σ_k s_k ≥ 1: no underflow to 0/0. With τ = 1, ``raw`` is exactly the
paper's equation (and this rule's weights before the ``relative`` scale was added).

Why m = the round's mean |loss| ([A]; PAPERS.md §4 suggests L̄_k / mean_j L̄_j):

- *Scale-free.* Multiplying every loss by c > 0 multiplies the gaps and m by c: the weights do not change, so
  Barlow Twins at ≈ 50 and ACOP at ≈ 1.8 get the spread of their *relative* differences (a client 2 % above the
  best gets exp(−0.02/τ) of its score, whatever the units).
- *The paper's sharpness at the paper's scale.* ``relative`` is ``raw`` applied to the losses in units of the
  round's mean (L̄_k/m, mean 1), the order of FedVSSL's own losses, so τ = 1 keeps the paper's strength.
- *Not the spread.* Dividing by the standard deviation (or MAD, or max − min) of the losses would also be
  scale-free, but it fixes the weights' spread whatever the losses are: clients whose losses differ by noise
  (0.1 %) would be weighted as unequally as clients that differ by 50 %. A loss's distance from 0 carries
  meaning for every objective here, so the rule is deliberately not shift-invariant.
- *Not the minimum.* Dividing by min_j L̄_j would let one client that drives its loss near 0 (a small,
  overfitted shard) blow up every gap, the failure this scale fixes; the mean is steadied by all K clients.
- *Defined for every finite input.* Every loss implemented here is ≥ 0 (cross entropy, NT-Xent, BYOL's
  2 − 2 cos, Barlow Twins' sum of squares, proximal and KL terms), where m is the mean loss. The absolute value
  keeps m ≥ 0 for an objective that can go negative (e.g. SimSiam's −cos), where a plain mean could be ≤ 0.
  m = 0 only when every loss is 0; then every gap is 0 and the weights are equal (0/0 is read as 0). The
  relative gap (L̄_k − min_j L̄_j)/m is at most 2K, and at most K for losses ≥ 0, so it is always finite; it is
  computed on L̄_k / max_j |L̄_j| (the same ratio), so m neither overflows nor underflows.
- Equal losses give equal weights in both scales. Non-finite losses never reach the rule (screening rejects
  the update, :mod:`fedcore.aggregation.base`); :meth:`LossWeighted.combine` refuses them if called directly.

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
from fedcore.errors import AggregationError

LOSS_SCALES = ("relative", "raw")


def loss_scores(losses: Sequence[float], *, scale: str = "relative", temperature: float = 1.0) -> list[float]:
    """The unnormalised scores s_k of the module docstring (the best client scores 1, the others less).

    Parameters
    ----------
    losses : sequence of float
        L̄_k per client, finite, at least one.
    scale : {"relative", "raw"}
        ``relative``: gaps divided by the mean |loss| m; ``raw``: the paper's exp(−L̄_k).
    temperature : float
        τ > 0, dividing every gap.

    Raises
    ------
    AggregationError
        If ``losses`` is empty or holds a non-finite value.
    ValueError
        If ``scale`` is not one of :data:`LOSS_SCALES`.
    """
    if not losses or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses):
        raise AggregationError(f"LossWeighted: the losses must be finite numbers, at least one. Got {losses!r}.")
    if scale == "relative":
        # (L_k − min L) / m computed on L / max|L| (the same ratio): no overflow or underflow of m, and m ≥ 1/K.
        largest = max(abs(loss) for loss in losses)
        if largest == 0.0:  # every loss is 0: m = 0, every gap 0, equal weights
            return [1.0] * len(losses)
        losses = [loss / largest for loss in losses]
        lowest = min(losses)
        mean_abs = math.fsum(abs(loss) for loss in losses) / len(losses)
        gaps = [(loss - lowest) / mean_abs for loss in losses]
    elif scale == "raw":
        lowest = min(losses)
        gaps = [loss - lowest for loss in losses]
    else:
        raise ValueError(f"LossWeighted: 'loss_scale' must be one of {', '.join(LOSS_SCALES)}. Got {scale!r}.")
    return [math.exp(-(gap / temperature)) for gap in gaps]


@AGGREGATORS.register("loss")
class LossWeighted(Aggregator):
    """Loss-weighted mean, optionally mixed with FedAvg by γ (``loss_gamma``).

    w_{t+1} = γ Σ_k (n_k/n) w^k + (1 − γ) Σ_k s_k w^k / Σ_k s_k with, for ``loss_scale="relative"``,
    s_k = exp(−(L̄_k − min_j L̄_j) / (τ · m)), m = (1/K) Σ_j |L̄_j|, and for ``"raw"`` (FedVSSL's exp(−L̄_k))
    s_k = exp(−(L̄_k − min_j L̄_j) / τ). See the module docstring for why the mean |loss|.

    Parameters
    ----------
    loss_gamma : float
        γ in [0, 1], the FedAvg share of the mix. 0 (default): pure loss weighting; FedVSSL uses 0.2.
    loss_scale : {"relative", "raw"}
        ``"relative"`` (default, [A]): gaps in units of the round's mean |loss|, so the weights do not change
        when every loss is multiplied by c > 0. ``"raw"``: the paper's equation on the losses as reported
        (reproduction; one client dominates when losses are large, e.g. Barlow Twins).
    loss_temperature : float
        τ > 0, finite, dividing the (normalised) gap. [A] 1.0: with ``"raw"``, the paper's equation; with
        ``"relative"``, the paper's sharpness for losses of mean 1. Smaller τ: sharper weights.
    flag_ratio : float
        See :class:`~fedcore.aggregation.base.Aggregator`.
    """

    required_metrics = ("train_loss",)

    def __init__(self, *, loss_gamma: float = 0.0, loss_scale: str = "relative", loss_temperature: float = 1.0,
                 flag_ratio: float = 0.5) -> None:
        super().__init__(flag_ratio=flag_ratio)
        if isinstance(loss_gamma, bool) or not isinstance(loss_gamma, (int, float)) or not 0.0 <= loss_gamma <= 1.0:
            raise ValueError(f"LossWeighted: 'loss_gamma' must be in [0, 1]. Got {loss_gamma!r}.")
        if loss_scale not in LOSS_SCALES:
            raise ValueError(f"LossWeighted: 'loss_scale' must be one of {', '.join(LOSS_SCALES)}. "
                             f"Got {loss_scale!r}.")
        if (isinstance(loss_temperature, bool) or not isinstance(loss_temperature, (int, float))
                or not math.isfinite(loss_temperature) or loss_temperature <= 0):
            raise ValueError(f"LossWeighted: 'loss_temperature' must be a finite float > 0. "
                             f"Got {loss_temperature!r}.")
        self.loss_gamma = float(loss_gamma)
        self.loss_scale = loss_scale
        self.loss_temperature = float(loss_temperature)

    def combine(self, global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int) -> Combination:
        """w_{t+1} = γ Σ (n_k/n) w^k + (1 − γ) Σ s_k w^k / Σ s_k."""
        losses = [float(u.metrics["train_loss"]) for u in updates]
        scores = loss_scores(losses, scale=self.loss_scale, temperature=self.loss_temperature)
        total = sum(scores)
        counts = nominal_weights(updates, count_weighted=True)
        gamma = self.loss_gamma
        weights = {u.client_id: gamma * counts[u.client_id] + (1.0 - gamma) * s / total
                   for u, s in zip(updates, scores, strict=True)}
        state = combine_weighted(global_state, updates, [weights[u.client_id] for u in updates])
        return Combination(state=state, weights=weights)
