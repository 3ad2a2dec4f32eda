"""The statistics behind seeds.md: a bootstrap interval of a mean over users and a paired per-user test."""

import math

import numpy as np
import pytest

from proper_fed.data.significance import ZERO_METHOD, bootstrap_mean, paired_comparison, wilcoxon_p


def test_a_constant_difference_has_exactly_that_difference_as_its_interval():
    a = [0.5, 0.75, 1.0, 0.25, 0.5, 0.75]
    c = paired_comparison(a, [x - 0.25 for x in a])
    assert c.mean_difference == 0.25
    assert (c.interval.low, c.interval.high) == (0.25, 0.25)
    assert (c.wins, c.losses, c.ties) == (6, 0, 0)


def test_identical_methods_give_p_one_and_nothing_significant():
    a = [0.2, 0.4, 0.4, 0.6, 0.8, 1.0, 0.0, 0.5]
    c = paired_comparison(a, list(a))
    assert c.p_value == 1.0 and c.mean_difference == 0.0
    assert (c.wins, c.losses, c.ties) == (0, 0, 8)
    assert not c.significant


def test_equal_scores_up_to_float_noise_count_as_ties():
    # the same seeds' scores averaged in another order differ in the last bit
    a = [(0.1 + 0.2 + 0.3) / 3, (0.7 + 0.1 + 0.2) / 3]
    b = [(0.3 + 0.2 + 0.1) / 3, (0.2 + 0.1 + 0.7) / 3]
    assert paired_comparison(a, b).ties == 2


def test_a_clear_shift_is_significant_and_its_interval_holds_the_shift():
    rng = np.random.default_rng(1)
    b = rng.uniform(0.2, 0.6, size=20)
    a = b + 0.2 + rng.normal(0.0, 0.03, size=20)
    c = paired_comparison(a, b)
    assert c.significant and c.p_value < 0.001 and c.wins == 20
    assert c.interval.low < 0.2 < c.interval.high and c.interval.low > 0


def test_differences_that_cancel_out_are_not_significant():
    d = [0.25, -0.25, 0.5, -0.5, 0.125, -0.125, 0.0, 0.0]
    c = paired_comparison([0.5 + x for x in d], [0.5] * len(d))
    assert c.mean_difference == 0.0 and c.p_value > 0.5 and not c.significant
    assert (c.wins, c.losses, c.ties) == (3, 3, 2)


def test_for_an_error_metric_lower_wins():
    c = paired_comparison([1.0, 2.0, 1.5], [1.5, 2.5, 1.5], higher_is_better=False)
    assert c.mean_difference == pytest.approx(-1 / 3)
    assert (c.wins, c.losses, c.ties) == (2, 0, 1)


def test_the_bootstrap_is_deterministic_and_covers_the_mean():
    x = [0.1, 0.9, 0.4, 0.6, 0.3, 0.7, 0.2, 0.8]
    first, again = bootstrap_mean(x), bootstrap_mean(x)
    assert first == again
    assert first.low < np.mean(x) < first.high


def test_fewer_than_two_users_give_no_interval_and_no_significance():
    c = paired_comparison([0.9], [0.1])
    assert math.isnan(c.interval.low) and not c.interval.excludes(0.0) and not c.significant
    assert math.isnan(wilcoxon_p([]))


def test_zero_differences_are_ranked_then_dropped():
    assert ZERO_METHOD == "pratt"
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0


def test_unpaired_values_are_refused():
    with pytest.raises(ValueError, match="one per user"):
        paired_comparison([0.1, 0.2], [0.1])
