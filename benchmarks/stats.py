"""Aggregate statistics over seeds, the way rliable reports them (Agarwal et al., 2021).

A handful of seeds gives a noisy mean and a misleading min/max, so results are the
interquartile mean (IQM: the mean of the middle 50 %, robust to one lucky or broken seed) with
a 95 % percentile-bootstrap confidence interval. Written out in a few lines rather than taking
rliable and its dependencies for three functions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: drop the lowest and highest quarter, average the rest.

    The quarter is rounded down, as ``scipy.stats.trim_mean(x, 0.25)`` (what rliable calls)
    does: 5 seeds keep the middle 3, 4 keep the middle 2, fewer than 4 keep all.
    """
    xs = sorted(float(v) for v in values)
    if not xs:
        return math.nan
    k = len(xs) // 4
    kept = xs[k : len(xs) - k]
    return sum(kept) / len(kept)


def bootstrap_ci(
    values: Sequence[float],
    stat: str = "iqm",
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of ``iqm`` (or ``mean``) over ``values``.

    Resamples ``values`` with replacement ``resamples`` times; the interval holds the middle
    ``confidence`` of the resampled statistics. Seeded, so a report is reproducible.
    """
    xs = [float(v) for v in values]
    if not xs:
        return math.nan, math.nan
    fn = iqm if stat == "iqm" else (lambda v: sum(v) / len(v))
    rng = random.Random(seed)
    stats = sorted(fn(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return _quantile(stats, tail), _quantile(stats, 1 - tail)


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def largest_drop(returns: Sequence[float]) -> float:
    """The largest fall from the best return so far to any later one (0 if it never falls)."""
    best, drop = -math.inf, 0.0
    for r in returns:
        best = max(best, r)
        drop = max(drop, best - r)
    return drop
