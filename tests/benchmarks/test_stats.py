"""``benchmarks.stats`` against hand computations and published t quantiles."""

from __future__ import annotations

import math

import pytest

from benchmarks.stats import format_pm, mean_sd, paired_t_interval, t_quantile, verdict


@pytest.mark.parametrize(("df", "expected"), [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)])
def test_t_quantile_matches_the_table(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_mean_sd_uses_n_minus_1() -> None:
    # mean 2; squared deviations 1 + 0 + 1 = 2; sd = sqrt(2 / 2) = 1 (sqrt(2/3) with n).
    assert mean_sd([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))


def test_paired_t_interval_by_hand() -> None:
    # Differences [0.01, 0.03, 0.02]: mean 0.02, sd 0.01, t_{0.975, 2} = 4.303.
    a, b = [0.81, 0.83, 0.82], [0.80, 0.80, 0.80]
    mean, low, high, n = paired_t_interval(a, b)
    half = 4.303 * 0.01 / math.sqrt(3)
    assert n == 3
    assert mean == pytest.approx(0.02)
    assert (low, high) == pytest.approx((0.02 - half, 0.02 + half), abs=1e-5)
    assert verdict(low, high) == "unresolved"  # 0.02 ± 0.0248 contains 0


def test_paired_t_interval_pairs_by_seed() -> None:
    # Seeds differ a lot but A beats B by about 0.01 on every seed: unpaired, it would be lost in the spread.
    a, b = [0.51, 0.71, 0.915, 0.61, 0.81], [0.50, 0.70, 0.90, 0.60, 0.80]
    result = paired_t_interval(a, b, confidence=0.95)
    # Differences [0.01, 0.01, 0.015, 0.01, 0.01]: mean 0.011, sd sqrt(0.0000200 / 4) = 0.002236.
    half = 2.776 * math.sqrt(0.00002 / 4) / math.sqrt(5)
    assert result.mean_diff == pytest.approx(0.011)
    assert (result.low, result.high) == pytest.approx((0.011 - half, 0.011 + half), abs=1e-5)
    assert verdict(result.low, result.high) == "holds"
    assert verdict(*paired_t_interval(b, a)[1:3]) == "does not hold"


def test_paired_t_interval_widens_with_confidence() -> None:
    a, b = [0.9, 0.8, 0.85, 0.7], [0.8, 0.75, 0.85, 0.6]
    narrow, wide = paired_t_interval(a, b, confidence=0.8), paired_t_interval(a, b, confidence=0.99)
    assert wide.low < narrow.low < narrow.mean_diff < narrow.high < wide.high


@pytest.mark.parametrize(("low", "high", "favourable", "expected"), [
    (0.01, 0.03, "positive", "holds"),
    (-0.03, -0.01, "positive", "does not hold"),
    (-0.01, 0.03, "positive", "unresolved"),
    (0.0, 0.03, "positive", "unresolved"),
    (-0.03, -0.01, "negative", "holds"),
    (0.01, 0.03, "negative", "does not hold"),
    (-0.01, 0.01, "negative", "unresolved"),
])
def test_verdict(low: float, high: float, favourable: str, expected: str) -> None:
    assert verdict(low, high, favourable) == expected  # type: ignore[arg-type]


def test_format_pm() -> None:
    assert format_pm(0.87312, 0.0121) == "0.873 ± 0.012"
    assert format_pm(12.0, 1.25, digits=1) == "12.0 ± 1.2"


def test_paired_t_interval_refuses_unequal_lengths() -> None:
    with pytest.raises(ValueError, match=r"'a' and 'b' must have the same length .* Got 3 and 2"):
        paired_t_interval([1, 2, 3], [1, 2])


@pytest.mark.parametrize("values", [[], [0.5]])
def test_single_seed_is_refused(values: list[float]) -> None:
    with pytest.raises(ValueError, match=f"at least 2 values .* Got {len(values)}"):
        mean_sd(values)
    with pytest.raises(ValueError, match=f"at least 2 values .* Got {len(values)}"):
        paired_t_interval(values, values)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        mean_sd([0.5, math.nan])
    with pytest.raises(ValueError, match="'confidence' must be in"):
        paired_t_interval([1, 2], [1, 2], confidence=95)
    with pytest.raises(ValueError, match="'favourable' must be"):
        verdict(0.1, 0.2, "up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="low <= high"):
        verdict(0.2, 0.1)


def test_stats_helpers_are_exported_from_benchlib() -> None:
    from benchmarks import benchlib, stats

    assert benchlib.paired_t_interval is stats.paired_t_interval
    assert benchlib.verdict is stats.verdict


def test_claim_part_gives_the_interval_verdict_and_seeds_needed() -> None:
    from benchmarks.stats import claim_part

    part = claim_part({0: 0.01, 1: 0.03, 2: 0.02})
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert part["mean_diff"] == pytest.approx(0.02) and part["low"] == pytest.approx(0.02 - half)
    assert part["verdict"] == "unresolved" and part["seeds_needed"] == 3 and part["note"] == ""
    small = claim_part({0: 0.010, 1: 0.012, 2: 0.011})
    assert small["verdict"] == "holds" and small["seeds_needed"] == 5 and small["note"] == "needs 5 seeds (has 3)"
    assert claim_part({0: 0.010, 1: 0.012, 2: 0.011}, margin=0.02)["verdict"] == "does not hold"
    assert claim_part({0: 0.5})["verdict"] == "unresolved" and claim_part({})["n"] == 0


def test_overall_needs_every_part_to_hold() -> None:
    from benchmarks.stats import overall

    assert overall(["holds", "holds"]) == "holds"
    assert overall(["holds", "unresolved"]) == "unresolved"
    assert overall(["holds", "does not hold", "unresolved"]) == "does not hold"
    assert overall([]) == "unresolved"
