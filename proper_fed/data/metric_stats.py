"""Metrics as additive sufficient statistics, so devices send numbers and the server still computes the
official pooled metrics exactly (macro-F1 cannot be averaged over users; its per-label counts can be summed).

Per query, every task type contributes `n` and `parsed` (the answer names a valid label, a number in range,
or is a non-empty text). Classification adds `correct` and per label `tp.<i>`, `fp.<i>`, `fn.<i>`, where `i`
is the label's index in the task's public label set (`task.labels`): label names never appear in a key, so the
keys a device may send are known before the run (see `reply_schema.py`). Rating adds `abs_err`, `sq_err` (an
unparseable answer counts as the farther end of the scale); generation `rouge1`, `rougeL` (per-query
F-measures, summed).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

from proper_fed.data.metrics import rating_metrics, rouge_metrics
from proper_fed.data.task_spec import TaskSpec

PER_LABEL = ("tp", "fp", "fn")


def label_key(kind: str, index: int) -> str:
    """The statistic of one label: `tp.3` is the true positives of `task.labels[3]`."""
    return f"{kind}.{index}"


def _classification(index: Mapping[str, int], pred: object, gold: str, stats: Counter[str]) -> None:
    p, g = str(pred).strip(), str(gold).strip()
    stats["parsed"] += int(p in index)
    # A gold outside the label set cannot pass data validation; if one does, it is simply wrong.
    right = p == g and g in index
    stats["correct"] += int(right)
    if right:
        stats[label_key("tp", index[g])] += 1
        return
    if g in index:
        stats[label_key("fn", index[g])] += 1
    if p in index:
        stats[label_key("fp", index[p])] += 1


def query_stats(task: TaskSpec, raw_predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """Summed statistics of a list of (raw model output, gold) pairs."""
    stats: Counter[str] = Counter()
    index = {label: i for i, label in enumerate(task.labels)}
    for raw, gold in zip(raw_predictions, golds, strict=True):
        pred = task.parse_output(raw)
        stats["n"] += 1
        if task.type == "classification":
            _classification(index, pred, gold, stats)
        elif task.type == "rating":
            stats["parsed"] += int(pred is not None)
            err = rating_metrics([pred], [gold], task.scale or (1, 5))["mae"]
            stats["abs_err"] += err
            stats["sq_err"] += err * err
        else:
            stats["parsed"] += int(bool(str(pred)))
            r = rouge_metrics([pred], [gold])
            stats["rouge1"] += r["rouge1"]
            stats["rougeL"] += r["rougeL"]
    return dict(stats)


def add_stats(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total: Counter[str] = Counter()
    for part in parts:
        total.update(dict(part))
    return dict(total)


def parse_rate(stats: Mapping[str, float]) -> float | None:
    """The share of answers that name a valid label, a number in range or a non-empty text; None when the
    statistics carry no `parsed` count (or no query)."""
    n = stats.get("n", 0)
    if not n or "parsed" not in stats:
        return None
    return stats["parsed"] / n


def metrics_from_stats(task: TaskSpec, stats: Mapping[str, float]) -> dict[str, float]:
    """The official metrics of the pooled queries the statistics were summed over."""
    n = stats.get("n", 0)
    if n == 0:
        return {}
    if task.type == "classification":
        f1s = []
        for i in range(len(task.labels)):
            tp, fp, fn = (stats.get(label_key(k, i), 0) for k in PER_LABEL)
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        return {"accuracy": stats.get("correct", 0) / n, "f1": sum(f1s) / len(f1s)}
    if task.type == "rating":
        return {"mae": stats.get("abs_err", 0) / n, "rmse": math.sqrt(stats.get("sq_err", 0) / n)}
    return {"rouge1": stats.get("rouge1", 0) / n, "rougeL": stats.get("rougeL", 0) / n}


# task type -> the metric the tables compare by, and whether higher is better
PRIMARY_METRIC: Mapping[str, tuple[str, bool]] = MappingProxyType(
    {"classification": ("accuracy", True), "rating": ("mae", False), "generation": ("rougeL", True)}
)
