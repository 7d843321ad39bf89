"""Seed statistics for the quality benchmark: Student-t intervals and paired differences.

A cell's runs differ only in `seed`; two methods run on the same seeds are compared by their
per-seed differences (paired), which removes what the seed does to both. A difference whose 95%
interval contains 0 is a tie, one whose whole interval is within a negligible margin of 0 is
"same". Fewer than `MIN_SEEDS` seeds (the issue's floor: a 2-seed t-interval rests on one
degree of freedom) are shown as means without an interval or a verdict.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from scipy import stats

LEVEL = 0.95
# Nats below which a paired difference is no difference: the round-off between the exact and
# the randomised SVD is 3e-5, the smallest seed noise between methods 0.001-0.002.
NEGLIGIBLE = 0.001
MIN_SEEDS = 3  # seeds a cell or a paired difference needs before it gets an interval and a verdict


@dataclass(frozen=True)
class Interval:
    """A mean and the half-width of its t-interval (nan with fewer than two values)."""

    mean: float
    half: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def text(self, digits: int = 4, *, signed: bool = False) -> str:
        """'3.4096 ± 0.0123' (or '+0.0123 ± …'); '3.4096 (2 seeds)' under MIN_SEEDS seeds."""
        mean = f"{self.mean:+.{digits}f}" if signed else f"{self.mean:.{digits}f}"
        if self.n < MIN_SEEDS:
            return f"{mean} ({seeds(self.n)})"
        return f"{mean} ± {self.half:.{digits}f}"


def seeds(n: int) -> str:
    """'1 seed', '2 seeds'."""
    return f"{n} seed" + ("" if n == 1 else "s")


def t_interval(values: Iterable[float], *, level: float = LEVEL) -> Interval:
    """Mean ± t_{(1+level)/2, n−1}·s/√n over `values` (s: the sample standard deviation)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("t_interval needs at least one value")
    if any(not math.isfinite(x) for x in xs):
        raise ValueError(f"t_interval got a non-finite value: {xs}")
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return Interval(mean, math.nan, len(xs))
    quantile = stats.t.ppf((1 + level) / 2, len(xs) - 1)
    return Interval(mean, quantile * statistics.stdev(xs) / math.sqrt(len(xs)), len(xs))


def paired(
    a: Mapping[int, float], b: Mapping[int, float], *, level: float = LEVEL
) -> Interval | None:
    """The t-interval of a[s] − b[s] over the seeds both have; None if they share none."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return t_interval([a[s] - b[s] for s in seeds], level=level)


def verdict(diff: Interval | None, *, lower_is_better: bool = True, negligible: float = 0.0) -> str:
    """'better'/'worse' (interval excludes 0), 'tie' (holds 0), 'same' (wholly within
    `negligible` of 0: equal up to round-off, however sure), 'n/a' (under MIN_SEEDS seeds)."""
    if diff is None or diff.n < MIN_SEEDS:
        return "n/a"
    if max(abs(diff.low), abs(diff.high)) < negligible:
        return "same"
    if diff.low <= 0 <= diff.high:
        return "tie"
    lower = diff.high < 0
    return "better" if lower == lower_is_better else "worse"
