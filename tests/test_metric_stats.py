"""Devices send additive statistics; the server's pooled metrics must equal the official scorer's."""

import random

import pytest

from proper_fed.data import get_task
from proper_fed.data.metric_stats import add_stats, metrics_from_stats, parse_rate, query_stats
from proper_fed.data.metrics import classification_metrics, rating_metrics, rouge_metrics


def _split(xs, sizes):
    out, i = [], 0
    for n in sizes:
        out.append(xs[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("name", ["LaMP-1", "LaMP-2", "LaMP-2N"])
def test_classification_stats_summed_over_users_equal_pooled_official_metrics(name):
    task = get_task(name)
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


def test_per_label_statistics_are_keyed_by_the_labels_index_never_its_name():
    movies, news, lamp1 = get_task("LaMP-2"), get_task("LaMP-2N"), get_task("LaMP-1")
    assert query_stats(movies, ["The tag is dark comedy."], ["dark comedy"]) == {
        "n": 1, "parsed": 1, "correct": 1, "tp.6": 1,
    }  # fmt: skip
    assert query_stats(news, ["food & drink"], ["style & beauty"]) == {
        "n": 1, "parsed": 1, "correct": 0, "fn.3": 1, "fp.5": 1,
    }  # fmt: skip
    stats = query_stats(lamp1, ["[2]", "I cannot tell"], ["[1]", "[2]"])
    assert stats == {"n": 2, "parsed": 1, "correct": 0, "fn.0": 1, "fp.1": 1, "fn.1": 1}
    for task in (movies, news, lamp1):
        keys = query_stats(task, list(task.labels), list(reversed(task.labels)))
        assert not any(label in key for key in keys for label in task.labels if not label.isdigit())


def test_a_gold_outside_the_label_set_counts_as_wrong_without_a_label_key():
    task = get_task("LaMP-2")
    stats = query_stats(task, ["comedy", "not a tag"], ["not a tag", "not a tag"])
    assert stats == {"n": 2, "parsed": 1, "correct": 0, "fp.2": 1}


def test_parsed_counts_answers_naming_a_label_a_number_in_range_or_any_text():
    assert query_stats(get_task("LaMP-2"), ["comedy", "a funny one", ""], ["comedy"] * 3)["parsed"] == 1
    assert query_stats(get_task("LaMP-3"), ["4", "9 of 10", "five"], ["4"] * 3)["parsed"] == 1
    assert query_stats(get_task("LaMP-4"), ["A headline", "   "], ["x", "y"])["parsed"] == 1
    stats = add_stats([query_stats(get_task("LaMP-3"), ["4", "none"], ["4", "3"]), {"n": 2, "parsed": 2}])
    assert parse_rate(stats) == pytest.approx(3 / 4)
    assert parse_rate({}) is None and parse_rate({"n": 3}) is None
