"""Metrics agree with hand computation of the official LaMP scorer's rules."""

import math

import pytest

from proper_fed.data import (
    classification_metrics,
    cohort_metrics,
    evaluate_predictions,
    get_task,
    per_user_metrics,
    rating_metrics,
    rouge_metrics,
)
from proper_fed.data.types import ProfileItem, Query, User
from proper_fed.errors import DataError


def test_macro_f1_counts_absent_labels_as_zero():
    # a: P=1, R=1/2 -> F=2/3; b: P=1/2, R=1/2 -> F=1/2; c, d never occur -> 0; "x" is outside the set.
    result = classification_metrics(["a", "b", "b", "x"], ["a", "a", "b", "b"], ["a", "b", "c", "d"])
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx((2 / 3 + 1 / 2) / 4)


def test_classification_match_is_exact_after_strip_like_the_official_scorer():
    assert classification_metrics([" a ", "A"], ["a", "a"], ["a", "b"])["accuracy"] == pytest.approx(0.5)


def test_unparseable_rating_counts_as_the_farther_end():
    # 5 vs 5 -> 0; "abc" vs 1 -> 5 (farther) -> 4; None vs 3 -> tie -> 5 -> 2; "4" vs 2 -> 2.
    result = rating_metrics(["5", "abc", None, "4"], ["5", "1", "3", "2"])
    assert result["mae"] == pytest.approx(2.0)
    assert result["rmse"] == pytest.approx(math.sqrt(6.0))
    # gold 4: 1 is farther than 5
    assert rating_metrics(["?"], ["4"])["mae"] == pytest.approx(3.0)


def test_rouge_is_mean_f_measure_without_stemming():
    # "the cat sat" vs "a cat sat down": 2 shared unigrams, P=2/3, R=2/4 -> F=4/7; LCS "cat sat" -> same.
    result = rouge_metrics(["the cat sat", "hello world"], ["a cat sat down", "hello world"])
    assert result["rouge1"] == pytest.approx((4 / 7 + 1) / 2)
    assert result["rougeL"] == pytest.approx((4 / 7 + 1) / 2)
    assert rouge_metrics(["cats running"], ["cat run"])["rouge1"] == 0.0  # no stemmer, as HF evaluate


def test_metric_inputs_must_line_up():
    with pytest.raises(DataError, match="2 predictions for 1 golds"):
        rating_metrics(["1", "2"], ["1"])
    with pytest.raises(DataError, match="nothing to score"):
        rouge_metrics([], [])


def _users(sizes, golds):
    return [
        User(
            f"u{i}",
            tuple(ProfileItem(f"u{i}-{k}", {"description": "d", "tag": "comedy"}) for k in range(n)),
            (Query(f"q{i}", "x", g),),
        )
        for i, (n, g) in enumerate(zip(sizes, golds, strict=True))
    ]


def test_per_user_and_cohort_metrics():
    task = get_task("LaMP-2")
    users = _users([1, 2, 3, 4, 5, 6, 7, 8], ["comedy"] * 8)
    # Even users answered right, odd users with an unknown answer (parsed as raw text -> wrong).
    predictions = {f"q{i}": ("The tag: comedy" if i % 2 == 0 else "no clue") for i in range(8)}
    per_user = per_user_metrics(task, users, predictions)
    assert per_user["u0"]["accuracy"] == 1.0 and per_user["u1"]["accuracy"] == 0.0
    cohorts = cohort_metrics(task, users, predictions)
    assert list(cohorts) == ["Q1 (1-2 items)", "Q2 (3-4 items)", "Q3 (5-6 items)", "Q4 (7-8 items)"]
    assert all(c["accuracy"] == 0.5 and c["users"] == 2 and c["queries"] == 2 for c in cohorts.values())
    assert evaluate_predictions(task, users, predictions)["accuracy"] == 0.5


def test_users_with_equal_history_share_a_cohort():
    task = get_task("LaMP-2")
    users = _users([3, 3, 3, 3, 3, 9], ["comedy"] * 6)
    cohorts = cohort_metrics(task, users, {f"q{i}": "comedy" for i in range(6)})
    assert {k: v["users"] for k, v in cohorts.items()} == {"Q1 (3 items)": 5, "Q4 (9 items)": 1}


def test_missing_prediction_is_an_error():
    task = get_task("LaMP-2")
    with pytest.raises(DataError, match="no prediction for query 'q0'"):
        evaluate_predictions(task, _users([1], ["comedy"]), {})
