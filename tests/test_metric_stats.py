"""Devices send additive statistics; the server's pooled metrics must equal the official scorer's."""

import random

import pytest

from proper_fed.data import get_task
from proper_fed.data.metrics import classification_metrics, rating_metrics, rouge_metrics
from proper_fed.metric_stats import add_stats, metrics_from_stats, query_stats


def _split(xs, sizes):
    out, i = [], 0
    for n in sizes:
        out.append(xs[i : i + n])
        i += n
    return out


def test_classification_stats_summed_over_users_equal_pooled_official_metrics():
    task = get_task("LaMP-2")
    rng = random.Random(0)
    labels = list(task.labels)
    golds = [rng.choice(labels[:5]) for _ in range(40)]  # several labels never occur: macro-F1 counts them 0
    raws = [rng.choice([g, rng.choice(labels), "no idea"]) for g in golds]
    sizes = [3, 7, 10, 20]
    parts = [query_stats(task, r, g) for r, g in zip(_split(raws, sizes), _split(golds, sizes), strict=True)]
    pooled = metrics_from_stats(task, add_stats(parts))
    want = classification_metrics([task.parse_output(r) for r in raws], golds, task.labels)
    assert pooled == pytest.approx(want, abs=1e-12)


def test_rating_stats_keep_the_unparseable_rule():
    task = get_task("LaMP-3")
    golds = ["1", "5", "3", "4"]
    raws = ["2", "nonsense", "3", "5 stars"]
    pooled = metrics_from_stats(
        task, add_stats([query_stats(task, raws[:2], golds[:2]), query_stats(task, raws[2:], golds[2:])])
    )
    want = rating_metrics([task.parse_output(r) for r in raws], golds)
    assert pooled == pytest.approx(want)
    assert query_stats(task, ["nonsense"], ["5"])["abs_err"] == 4.0  # 1 is the farther end from 5


def test_rouge_stats_average_per_query_scores():
    task = get_task("LaMP-5")
    golds = ["a study of graphs", "deep nets for text", "on sparse data"]
    raws = ["a study of trees", "text nets", "sparse data on"]
    pooled = metrics_from_stats(
        task, add_stats([query_stats(task, raws[:1], golds[:1]), query_stats(task, raws[1:], golds[1:])])
    )
    assert pooled == pytest.approx(rouge_metrics(raws, golds))
