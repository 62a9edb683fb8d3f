"""LPA: layer-wise pruning aggregation (FedMLAC, Bai et al., arXiv:2506.10207; rule details are ours, [A]).

FedMLAC filters anomalous Plug-in updates "layer-wise, based on parameter deviations"; the statistic and the number
pruned are not public (PAPERS.md §1). For every layer (floating state-dict entry) l:

1. centre m^l: the coordinate-wise median of the received w_k^l (``lpa_center: median``), or the previous global
   w_g^l (``lpa_center: global``);
2. deviation d_k^l = ‖w_k^l − m^l‖₂;
3. prune, for this layer only, the clients with d_k^l > median(d^l) + κ · MAD(d^l), MAD(d) = median(|d − median(d)|)
   (``lpa_rule: mad``, κ = ``lpa_kappa``, default 2.5), or the ⌊ρK⌋ clients with the largest d_k^l
   (``lpa_rule: fraction``, ρ = ``lpa_fraction``, ties broken towards the larger client id);
4. w^l_{t+1} = Σ_{k kept} n_k w_k^l / Σ_{k kept} n_k.

The pruned clients of every layer are reported. A client is flagged when it was pruned from at least a
``flag_ratio`` share of the layers (default 0.5); its effective weight is its share averaged over the layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from fedcore.aggregation.base import AGGREGATORS, Aggregator, ClientUpdate, Combination, floating_keys, stacked
from fedcore.aggregation.median import coordinate_median
from fedcore.aggregation.state import StateDict


@AGGREGATORS.register("lpa")
class LayerwisePruning(Aggregator):
    """Per layer, drop the clients that deviate most from the centre; count-weighted mean of the rest.

    Parameters
    ----------
    lpa_rule : {"mad", "fraction"}
        Prune by median + κ·MAD of the deviations, or a fixed top fraction.
    lpa_kappa : float
        κ of the MAD rule (>= 0). [A] 2.5.
    lpa_fraction : float
        ρ of the fraction rule, in [0, 1). [A] 0.2.
    lpa_center : {"median", "global"}
        The centre the deviations are measured from.
    flag_ratio : float
        See :class:`~fedcore.aggregation.base.Aggregator`.
    """

    count_weighted = True

    def __init__(self, *, lpa_rule: Literal["mad", "fraction"] = "mad", lpa_kappa: float = 2.5,
                 lpa_fraction: float = 0.2, lpa_center: Literal["median", "global"] = "median",
                 flag_ratio: float = 0.5) -> None:
        super().__init__(flag_ratio=flag_ratio)
        problems = []
        if lpa_rule not in ("mad", "fraction"):
            problems.append(f"'lpa_rule' must be 'mad' or 'fraction'. Got {lpa_rule!r}.")
        if not lpa_kappa >= 0:
            problems.append(f"'lpa_kappa' must be >= 0. Got {lpa_kappa!r}.")
        if not 0.0 <= lpa_fraction < 1.0:
            problems.append(f"'lpa_fraction' must be in [0, 1). Got {lpa_fraction!r}.")
        if lpa_center not in ("median", "global"):
            problems.append(f"'lpa_center' must be 'median' or 'global'. Got {lpa_center!r}.")
        if problems:
            raise ValueError("LayerwisePruning: " + " ".join(problems))
        self.lpa_rule, self.lpa_kappa = lpa_rule, lpa_kappa
        self.lpa_fraction, self.lpa_center = lpa_fraction, lpa_center

    def pruned(self, deviations: torch.Tensor) -> list[int]:
        """Row indices (into ``deviations``, shape ``(K,)``) pruned by the configured rule."""
        size = deviations.numel()
        if self.lpa_rule == "fraction":
            count = int(self.lpa_fraction * size)
            # Stable sort on (-d, -index): the largest deviations first, ties towards the larger index.
            order = sorted(range(size), key=lambda i: (float(deviations[i]), i), reverse=True)
            return sorted(order[:count])
        centre = coordinate_median(deviations.reshape(-1, 1)).item()
        mad = coordinate_median((deviations - centre).abs().reshape(-1, 1)).item()
        threshold = centre + self.lpa_kappa * mad
        return [i for i in range(size) if float(deviations[i]) > threshold]

    def combine(self, global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int) -> Combination:
        """Per layer: prune by deviation from the centre, then Σ_kept n_k w_k / Σ_kept n_k."""
        keys = floating_keys(global_state)
        counts = torch.tensor([u.mass for u in updates], dtype=torch.float64)
        share = torch.zeros(len(updates), dtype=torch.float64)
        state: StateDict = {}
        excluded: dict[str, tuple[int, ...]] = {}
        for key in keys:
            matrix = stacked(updates, key)  # (K, numel)
            if self.lpa_center == "median":
                centre = coordinate_median(matrix)
            else:
                centre = global_state[key].detach().to("cpu", torch.float64).reshape(-1)
            deviations = torch.linalg.vector_norm(matrix - centre, dim=1)
            dropped = self.pruned(deviations)
            keep = torch.ones(len(updates), dtype=torch.float64)
            keep[dropped] = 0.0
            weights = keep * counts / float((keep * counts).sum())
            share += weights
            combined = torch.zeros(matrix.shape[1], dtype=torch.float64)
            for row in range(len(updates)):  # summed in client-id order, as FedAvg
                if weights[row] != 0.0:
                    combined.add_(matrix[row], alpha=float(weights[row]))
            state[key] = combined.reshape(global_state[key].shape)
            if dropped:
                excluded[key] = tuple(updates[i].client_id for i in dropped)
        share /= max(len(keys), 1)
        pruned_layers = {u.client_id: sum(u.client_id in ids for ids in excluded.values()) for u in updates}
        flagged = frozenset(c for c, n in pruned_layers.items() if keys and n >= self.flag_ratio * len(keys))
        return Combination(state=state, weights={u.client_id: float(share[i]) for i, u in enumerate(updates)},
                           excluded_per_layer=excluded, flagged=flagged)
