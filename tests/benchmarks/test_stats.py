"""The seed statistics the learning benchmark reports, on inputs with known answers."""

from __future__ import annotations

import math

import pytest

from benchmarks.stats import bootstrap_ci, iqm, largest_drop


def test_iqm_drops_a_quarter_at_each_end_like_scipy_trim_mean() -> None:
    assert iqm([1, 2, 3, 4]) == 2.5  # middle two
    assert iqm([-100, 1, 2, 3, 1000]) == 2.0  # five seeds: the middle three, outliers gone
    assert iqm([5.0]) == 5.0 and iqm([1, 3]) == 2.0  # under four values: the plain mean
    assert iqm(list(range(8))) == pytest.approx(3.5)  # 2..5
    assert math.isnan(iqm([]))
    assert iqm([3, 1, 2, 4]) == iqm([1, 2, 3, 4])  # order does not matter


def test_bootstrap_interval_brackets_the_statistic_and_shrinks_with_more_seeds() -> None:
    few = [-40.0, -35.0, -30.0, -32.0, -38.0]
    lo, hi = bootstrap_ci(few)
    assert lo <= iqm(few) <= hi and lo >= min(few) and hi <= max(few)
    many = few * 8
    lo2, hi2 = bootstrap_ci(many)
    assert hi2 - lo2 < hi - lo
    assert bootstrap_ci(few) == bootstrap_ci(few)  # seeded: reproducible
    assert bootstrap_ci([7.0, 7.0, 7.0]) == (7.0, 7.0)  # no spread, no interval


def test_largest_drop_is_from_the_best_so_far_to_a_later_value() -> None:
    assert largest_drop([-60, -40, -30, -48, -44]) == 18  # -30 then -48
    assert largest_drop([-60, -50, -40]) == 0  # never falls
    assert largest_drop([-30, -50, -20, -25]) == 20  # the early fall is the largest
