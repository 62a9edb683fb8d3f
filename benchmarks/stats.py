"""The statistics behind a benchmark claim: mean ± sd over seeds, and a paired t interval of a difference.

A claim "arm A beats arm B" compares the two arms run on the same seeds (same partition, same initial model),
so the per-seed differences carry the comparison (Student, Biometrika 1908; the paired t interval):

    d_i = a_i − b_i,  i = 1..n
    d̄ ± t_{(1+c)/2, n−1} · s_d / √n,   s_d² = Σ_i (d_i − d̄)² / (n − 1)

with c the confidence (0.95 gives t_{0.975, n−1}). The claim *holds* when the whole interval lies on the
favourable side of 0, *does not hold* when it lies on the other side, and is *unresolved* when it contains 0
(more seeds, or a smaller effect claimed). The t quantile comes from SciPy (installed with scikit-learn).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

Verdict = Literal["holds", "does not hold", "unresolved"]


class PairedInterval(NamedTuple):
    """A paired t interval: the mean difference ``mean_diff`` of ``a − b``, its bounds and the pair count."""

    mean_diff: float
    low: float
    high: float
    n: int


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n − 1 in the denominator) of per-seed values.

    Raises
    ------
    ValueError
        If there are fewer than 2 values (no spread to estimate) or one is not finite.
    """
    values = _checked("mean_sd", "values", values)
    return statistics.fmean(values), statistics.stdev(values)


def t_quantile(probability: float, df: int) -> float:
    """Student's t quantile ``t_{probability, df}`` (``t_quantile(0.975, 2)`` ≈ 4.303)."""
    if not 0 < probability < 1:
        raise ValueError(f"t_quantile: 'probability' must be in (0, 1). Got {probability!r}.")
    if df < 1:
        raise ValueError(f"t_quantile: 'df' must be an int >= 1. Got {df!r}.")
    from scipy.stats import t

    return float(t.ppf(probability, df))


def paired_t_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedInterval:
    """The ``confidence`` t interval of the mean of the per-seed differences ``a[i] − b[i]``.

    ``a`` and ``b`` hold one value per seed, in the same seed order.

    Raises
    ------
    ValueError
        If the lengths differ, there are fewer than 2 pairs, a value is not finite, or ``confidence`` is not
        in (0, 1).
    """
    if len(a) != len(b):
        raise ValueError(f"paired_t_interval: 'a' and 'b' must have the same length (one value per seed, in the "
                         f"same seed order). Got {len(a)} and {len(b)}.")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_t_interval: 'confidence' must be in (0, 1). Got {confidence!r}.")
    a = _checked("paired_t_interval", "a", a)
    b = _checked("paired_t_interval", "b", b)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return PairedInterval(mean, mean - half, mean + half, n)


def verdict(low: float, high: float, favourable: Literal["positive", "negative"] = "positive") -> Verdict:
    """Whether an interval ``[low, high]`` of a difference supports a claim whose favourable sign is given.

    ``"holds"`` when the interval lies strictly on the favourable side of 0, ``"does not hold"`` when it lies
    strictly on the other side, ``"unresolved"`` when it contains 0.
    """
    if favourable not in ("positive", "negative"):
        raise ValueError(f"verdict: 'favourable' must be 'positive' or 'negative'. Got {favourable!r}.")
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"verdict: 'low' and 'high' must be finite with low <= high. Got {low!r} and {high!r}.")
    if low <= 0 <= high:
        return "unresolved"
    above = low > 0
    return "holds" if above == (favourable == "positive") else "does not hold"


def format_pm(mean: float, sd: float, digits: int = 3) -> str:
    """``"0.873 ± 0.012"``: a mean and its standard deviation to ``digits`` decimals."""
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


#: A claimed accuracy difference under this is "small": it needs :data:`SEEDS_FOR_SMALL` seeds (issue 21), else 3.
SMALL_DIFFERENCE, SEEDS_FOR_SMALL, SEEDS = 0.02, 5, 3


def claim_part(diffs: Mapping[int, float], margin: float = 0.0, *, accuracy: bool = True) -> dict[str, Any]:
    """The claim "mean d > margin" over per-seed paired differences ``diffs`` (seed → d): 95% t interval, verdict.

    ``holds`` when the whole interval lies above ``margin``, ``does not hold`` when below, else ``unresolved``
    (also with fewer than 2 seeds: no interval). ``seeds_needed``: :data:`SEEDS_FOR_SMALL` for an ``accuracy``
    difference under :data:`SMALL_DIFFERENCE`, else :data:`SEEDS`; ``note`` says when the claim ran on fewer.
    """
    seeds = sorted(diffs)
    out: dict[str, Any] = {"seeds": seeds, "n": len(seeds), "margin": margin, "mean_diff": None, "low": None,
                           "high": None, "verdict": "unresolved"}
    if len(seeds) < 2:
        return {**out, "seeds_needed": SEEDS, "note": f"{len(seeds)} paired seed(s): no interval"}
    mean, low, high, n = paired_t_interval([diffs[s] for s in seeds], [0.0] * len(seeds))
    needed = SEEDS_FOR_SMALL if accuracy and abs(mean) < SMALL_DIFFERENCE else SEEDS
    out.update(mean_diff=mean, low=low, high=high, verdict=verdict(low - margin, high - margin),
               seeds_needed=needed, note="" if n >= needed else f"needs {needed} seeds (has {n})")
    return out


def overall(verdicts: Sequence[str]) -> Verdict:
    """A claim of several parts: holds if every part holds, does not hold if one does not, else unresolved."""
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    return "does not hold" if "does not hold" in verdicts else "unresolved"


def interval_text(part: Mapping[str, Any]) -> tuple[str, str]:
    """A :func:`claim_part`'s mean difference and 95% interval as table cells (``—`` without an interval)."""
    if part["mean_diff"] is None:
        return "—", "—"
    return f"{part['mean_diff']:+.3f}", f"[{part['low']:+.3f}, {part['high']:+.3f}]"


def claim_verdicts(parts: Sequence[Mapping[str, Any]]) -> list[str]:
    """One markdown line per claim of ``parts`` (rows with ``claim`` and ``verdict``): its :func:`overall` verdict."""
    lines = []
    for claim in dict.fromkeys(part["claim"] for part in parts):
        verdicts = [part["verdict"] for part in parts if part["claim"] == claim]
        lines.append(f"- {claim}: **{overall(verdicts)}** ({len(verdicts)} parts)")
    return lines


def _checked(where: str, name: str, values: Sequence[float]) -> list[float]:
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ValueError(f"{where}: '{name}' must hold at least 2 values (one per seed) to estimate a spread. "
                         f"Got {len(values)}. Run more seeds.")
    if bad := [v for v in values if not math.isfinite(v)]:
        raise ValueError(f"{where}: '{name}' must hold finite values. Got {bad!r}.")
    return values
