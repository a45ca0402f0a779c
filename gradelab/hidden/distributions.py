"""Random draws (the weights of freshly built models), judged at a stated false-fail rate.

A test that judges random draws (the weights of freshly built models) fails a correct answer
whenever its draws happen to look unusual. assert_distribution derives its thresholds from
`alpha`: a sample truly drawn from the expected distribution fails with probability at most
alpha, split evenly (Bonferroni) over the checks it makes. How many draws a test takes is then a
question of power alone: enough for every wrong answer it must catch to fall outside the
thresholds. bench/fairness.py measures both rates as the grader runs the tests.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import torch


@dataclass(frozen=True)
class Uniform:
    """The uniform distribution on [low, high]. Checked: the smallest and the largest value (inside
    the range, and near its ends), the mean and the spread."""

    low: float
    high: float

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2

    @property
    def std(self) -> float:
        return (self.high - self.low) / math.sqrt(12)

    def squared_deviation_moments(self) -> list[float]:
        """E[d^2], E[d^4], E[d^6], E[d^8] of d = x - mean."""
        half = (self.high - self.low) / 2
        return [half ** (2 * k) / (2 * k + 1) for k in range(1, 5)]

    def __str__(self) -> str:
        return f"uniformly from [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Normal:
    """The normal distribution N(mean, std^2). Checked: the mean, the spread, and the share of
    values more than `tail` standard deviations from the mean, which tells it from a uniform
    distribution of the same spread (that has none beyond 1.73)."""

    mean: float
    std: float
    tail: float = 2.0

    def squared_deviation_moments(self) -> list[float]:
        return [self.std ** (2 * k) * double for k, double in enumerate((1, 3, 15, 105), start=1)]

    def __str__(self) -> str:
        return f"from a normal distribution N({self.mean:g}, {self.std:.3g}²)"


@dataclass(frozen=True)
class DistributionCheck:
    """A statistic of the sample and the interval that a sample from the expected distribution
    leaves with probability at most `rate`."""

    statistic: str  # smallest, largest, mean, spread (root mean square distance from the mean), tail
    low: float
    high: float
    rate: float


@functools.lru_cache(maxsize=64)
def distribution_checks(expected: Uniform | Normal, n: int, alpha: float = 1e-6) -> tuple[DistributionCheck, ...]:
    """The checks assert_distribution makes on `n` values, in order; their rates add up to alpha.

    smallest, largest: exact, P(no value within eps of an end) = (1 - eps)^n. mean: the normal
    distribution of the mean (exact for Normal; for Uniform the mean's tails are lighter). spread:
    the mean of the squared deviations, by its Cornish-Fisher expansion to second order (within a
    few percent of the rate for 100 values or more) at half the rate, which leaves a factor 2 for
    the expansion's error. tail: the exact binomial distribution of the count.
    """
    if n < 1:
        raise ValueError("a distribution check needs at least one value")
    statistics = (("smallest", "largest", "mean", "spread") if isinstance(expected, Uniform)
                  else ("mean", "spread", "tail"))
    rate = alpha / len(statistics)
    checks = []
    for statistic in statistics:
        if statistic in ("smallest", "largest"):
            reach = (1 - rate ** (1 / n)) * (expected.high - expected.low)
            low, high = ((expected.low, expected.low + reach) if statistic == "smallest"
                         else (expected.high - reach, expected.high))
        elif statistic == "mean":
            margin = NormalDist().inv_cdf(1 - rate / 2) * expected.std / math.sqrt(n)
            low, high = expected.mean - margin, expected.mean + margin
        elif statistic == "spread":
            low, high = _mean_interval(expected.squared_deviation_moments(), n, rate / 4)
            low, high = math.sqrt(max(low, 0.0)), math.sqrt(high)
        else:
            p = 2 * NormalDist().cdf(-expected.tail)
            fewest, most = _binomial_interval(n, p, rate / 2)
            low, high = fewest / n, most / n
        checks.append(DistributionCheck(statistic, low, high, rate))
    return tuple(checks)


def distribution_statistics(values: torch.Tensor, expected: Uniform | Normal) -> dict[str, float]:
    """The statistics that distribution_checks bounds, of a 1-d float64 tensor."""
    deviations = values - expected.mean
    found = {"smallest": float(values.min()), "largest": float(values.max()), "mean": float(values.mean()),
             "spread": float(deviations.square().mean().sqrt())}
    if isinstance(expected, Normal):
        found["tail"] = float((deviations.abs() > expected.tail * expected.std).to(torch.float64).mean())
    return found


def assert_distribution(values: Any, expected: Uniform | Normal, *, what: str, alpha: float = 1e-6,
                        hints: Mapping[str, str] | None = None) -> None:
    """Fail (AssertionError, for the student) unless `values` look drawn from `expected`. A sample
    that is drawn from it fails with probability at most `alpha`. `what` names the values in the
    plural ("build_model's weights"); `hints` adds advice to the message of a failed statistic
    (keys as in DistributionCheck.statistic)."""
    x = torch.as_tensor(values).detach().to(torch.float64).flatten()
    if x.numel() == 0:
        raise AssertionError(f"there are no {what} to check")
    if not bool(torch.isfinite(x).all()):
        raise AssertionError(f"{int((~torch.isfinite(x)).sum())} of {what} are not finite numbers")
    found = distribution_statistics(x, expected)
    for check in distribution_checks(expected, x.numel(), alpha):
        value = found[check.statistic]
        if not check.low <= value <= check.high:
            hint = (hints or {}).get(check.statistic)
            raise AssertionError(_distribution_problem(check, value, found, expected, what, x.numel())
                                 + (f": {hint}" if hint else ""))


def _distribution_problem(check: DistributionCheck, value: float, found: dict[str, float],
                          expected: Uniform | Normal, what: str, n: int) -> str:
    sample = f"{n} values drawn {expected}"
    if check.statistic in ("smallest", "largest") and not expected.low <= value <= expected.high:
        return (f"{what} range from {found['smallest']:.3f} to {found['largest']:.3f}; values drawn "
                f"{expected} never leave [{expected.low:g}, {expected.high:g}]")
    if check.statistic == "smallest":
        return (f"the smallest of {what} is {value:.3f}; {sample} have one below {check.high:.3f} "
                f"(all but once in {1 / check.rate:,.0f} samples)")
    if check.statistic == "largest":
        return (f"the largest of {what} is {value:.3f}; {sample} have one above {check.low:.3f} "
                f"(all but once in {1 / check.rate:,.0f} samples)")
    if check.statistic == "mean":
        return f"{what} average {value:.3f}; {sample} average between {check.low:.3f} and {check.high:.3f}"
    if check.statistic == "spread":
        return (f"the spread of {what} (their root mean square distance from {expected.mean:g}) is {value:.3f}; "
                f"for {sample} (standard deviation {expected.std:.3f}) it lies between {check.low:.3f} and "
                f"{check.high:.3f}")
    return (f"{value:.1%} of {what} lie more than {expected.tail:g} standard deviations from {expected.mean:g} "
            f"(beyond ±{expected.tail * expected.std:.3f}); of {sample}, between {check.low:.1%} and "
            f"{check.high:.1%} do")


def mean_quantile(moments: Sequence[float], n: int, z: float) -> float:
    """The quantile of the mean of n independent values with raw moments E[y], E[y^2], E[y^3],
    E[y^4] at standard-normal quantile z (its Cornish-Fisher expansion to second order)."""
    m1, m2, m3, m4 = moments
    k2 = m2 - m1**2
    k3 = m3 - 3 * m1 * m2 + 2 * m1**3
    k4 = m4 - 4 * m1 * m3 - 3 * m2**2 + 12 * m1**2 * m2 - 6 * m1**4
    skew, kurtosis = k3 / k2**1.5 / math.sqrt(n), k4 / k2**2 / n
    shifted = z + (z * z - 1) * skew / 6 + (z**3 - 3 * z) * kurtosis / 24 - (2 * z**3 - 5 * z) * skew**2 / 36
    return m1 + math.sqrt(k2 / n) * shifted


def _mean_interval(moments: Sequence[float], n: int, side_rate: float) -> tuple[float, float]:
    """Where the mean of n such values falls, except with probability side_rate on each side."""
    z = NormalDist().inv_cdf(1 - side_rate)
    return mean_quantile(moments, n, -z), mean_quantile(moments, n, z)


def _binomial_interval(n: int, p: float, side_rate: float) -> tuple[int, int]:
    """(fewest, most): a Binomial(n, p) count is below fewest, or above most, with probability at
    most side_rate each."""
    log_p, log_q = math.log(p), math.log1p(-p)
    pmf = [math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q)
           for k in range(n + 1)]
    fewest, below = 0, 0.0
    while below + pmf[fewest] <= side_rate:
        below += pmf[fewest]
        fewest += 1
    most, above = n, 0.0
    while above + pmf[most] <= side_rate:
        above += pmf[most]
        most -= 1
    return fewest, most
