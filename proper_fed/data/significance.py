"""How sure a comparison over users is: a bootstrap interval of a mean, and a paired per-user test.

The unit is the user: each user contributes one number (a metric, or a difference between two methods on
that user), users are resampled, and every method is compared on the same users. Deterministic: the
bootstrap draws from a generator seeded with `RNG_SEED`, so the same numbers give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 10_000
RNG_SEED = 0
ALPHA = 0.05
# Wilcoxon's treatment of users on which both methods score the same (common with accuracy over a few
# queries): Pratt's method ranks the zero differences with the others, then drops them, so ties make the
# test more conservative instead of vanishing from the ranking (scipy's default 'wilcox' drops them first).
ZERO_METHOD = "pratt"
# Per-user metrics averaged over seeds can differ by float noise where they are equal.
TIE_TOLERANCE = 1e-12


@dataclass(frozen=True)
class Interval:
    """A confidence interval; nan bounds when there is none (fewer than two users)."""

    low: float
    high: float

    def excludes(self, value: float) -> bool:
        if math.isnan(self.low) or math.isnan(self.high):
            return False
        return not self.low <= value <= self.high


def bootstrap_mean(
    values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = RNG_SEED
) -> Interval:
    """Percentile bootstrap interval of the mean of `values` (one per user, resampled with replacement).
    Values that are all equal give exactly that value; fewer than two give no interval."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return Interval(math.nan, math.nan)
    if np.all(x == x[0]):
        return Interval(float(x[0]), float(x[0]))
    res = stats.bootstrap(
        (x,),
        np.mean,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return Interval(float(res.confidence_interval.low), float(res.confidence_interval.high))


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired per-user differences (zero differences: `ZERO_METHOD`).
    Every difference zero: 1.0 (nothing to tell apart); no users: nan."""
    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return math.nan
    if not np.any(d):
        return 1.0
    return float(stats.wilcoxon(d, zero_method=ZERO_METHOD).pvalue)


@dataclass(frozen=True)
class PairedComparison:
    """Method a against method b on the same users. `mean_difference` = mean over users of a - b in the
    metric's units; `interval` its paired bootstrap interval; wins / losses / ties count the users on which
    a is better / worse / equal (better = higher, or lower for an error metric)."""

    users: int
    mean_difference: float
    interval: Interval
    p_value: float
    wins: int
    losses: int
    ties: int

    @property
    def significant(self) -> bool:
        """Both the test and the interval say so: p < ALPHA and the interval excludes 0."""
        return self.p_value < ALPHA and self.interval.excludes(0.0)


def paired_comparison(
    a: Sequence[float], b: Sequence[float], higher_is_better: bool = True, seed: int = RNG_SEED
) -> PairedComparison:
    """Compare two methods' per-user metrics, `a[i]` and `b[i]` on the same user i."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired values need one per user on both sides, got {x.shape} and {y.shape}")
    d = np.where(np.abs(x - y) <= TIE_TOLERANCE, 0.0, x - y)  # (users,)
    better = d if higher_is_better else -d
    return PairedComparison(
        users=int(d.size),
        mean_difference=float(d.mean()) if d.size else math.nan,
        interval=bootstrap_mean(d, seed=seed),
        p_value=wilcoxon_p(d),
        wins=int((better > 0).sum()),
        losses=int((better < 0).sum()),
        ties=int((better == 0).sum()),
    )
