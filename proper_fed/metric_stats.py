"""Metrics as additive sufficient statistics, so devices send numbers and the server still computes the
official pooled metrics exactly (macro-F1 cannot be averaged over users; its per-label counts can be summed).

Per query, classification contributes `n`, `correct` and per label `tp.<label>`, `fp.<label>`, `fn.<label>`;
rating `n`, `abs_err`, `sq_err` (an unparseable answer counts as the farther end of the scale); generation
`n`, `rouge1`, `rougeL` (per-query F-measures, summed).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from proper_fed.data.metrics import rating_metrics, rouge_metrics
from proper_fed.data.task_spec import TaskSpec


def query_stats(task: TaskSpec, raw_predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """Summed statistics of a list of (raw model output, gold) pairs."""
    stats: Counter[str] = Counter()
    for raw, gold in zip(raw_predictions, golds, strict=True):
        pred = task.parse_output(raw)
        stats["n"] += 1
        if task.type == "classification":
            p, g = str(pred).strip(), str(gold).strip()
            stats["correct"] += int(p == g)
            if p == g:
                stats[f"tp.{g}"] += 1
            else:
                stats[f"fn.{g}"] += 1
                if p in task.labels:
                    stats[f"fp.{p}"] += 1
        elif task.type == "rating":
            err = rating_metrics([pred], [gold], task.scale or (1, 5))["mae"]
            stats["abs_err"] += err
            stats["sq_err"] += err * err
        else:
            r = rouge_metrics([pred], [gold])
            stats["rouge1"] += r["rouge1"]
            stats["rougeL"] += r["rougeL"]
    return dict(stats)


def add_stats(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total: Counter[str] = Counter()
    for part in parts:
        total.update(dict(part))
    return dict(total)


def metrics_from_stats(task: TaskSpec, stats: Mapping[str, float]) -> dict[str, float]:
    """The official metrics of the pooled queries the statistics were summed over."""
    n = stats.get("n", 0)
    if n == 0:
        return {}
    if task.type == "classification":
        f1s = []
        for label in task.labels:
            tp, fp, fn = (stats.get(f"{k}.{label}", 0) for k in ("tp", "fp", "fn"))
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        return {"accuracy": stats.get("correct", 0) / n, "f1": sum(f1s) / len(f1s)}
    if task.type == "rating":
        return {"mae": stats.get("abs_err", 0) / n, "rmse": math.sqrt(stats.get("sq_err", 0) / n)}
    return {"rouge1": stats.get("rouge1", 0) / n, "rougeL": stats.get("rougeL", 0) / n}


def primary_metric(task: TaskSpec) -> tuple[str, bool]:
    """The metric tables sort by, and whether higher is better."""
    return {"classification": ("accuracy", True), "rating": ("mae", False)}.get(task.type, ("rougeL", True))
