"""Coordinate-wise trimmed mean (Yin et al., ICML 2018, arXiv:1803.01498).

For every coordinate, sort the K client values, drop the b = ⌊β K⌋ smallest and the b largest, and average the
remaining K − 2b (unweighted). β = 0 gives the uniform mean; β must be below 1/2 so that a value is left.
Detection: as for the median, a client's effective weight is its share of the kept values averaged over
coordinates; clients trimmed at most coordinates are flagged.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedcore.aggregation.base import AGGREGATORS, Aggregator, ClientUpdate, Combination
from fedcore.aggregation.median import trimmed_combination
from fedcore.aggregation.state import StateDict


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean(Aggregator):
    """Drop the ⌊βK⌋ lowest and highest values per coordinate and average the rest.

    Parameters
    ----------
    trim_beta : float
        β in [0, 0.5). [A] 0.2 (one of five clients may be an outlier on each side).
    flag_ratio : float
        See :class:`~fedcore.aggregation.base.Aggregator`.
    """

    def __init__(self, *, trim_beta: float = 0.2, flag_ratio: float = 0.5) -> None:
        super().__init__(flag_ratio=flag_ratio)
        if not 0.0 <= trim_beta < 0.5:
            raise ValueError(f"TrimmedMean: 'trim_beta' must be in [0, 0.5). Got {trim_beta!r}.")
        self.trim_beta = trim_beta

    def combine(self, global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int) -> Combination:
        """w[i] = mean of the values ranked b+1 .. K−b at coordinate i."""
        size = len(updates)
        cut = int(self.trim_beta * size)
        return trimmed_combination(global_state, updates, cut, size - cut)
