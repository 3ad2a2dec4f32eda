"""An independent re-implementation of the official LaMP scorer's rules (LaMP-Benchmark/LaMP,
eval/evaluation.py), written from its source without importing anything of proper_fed, so the tests can check
that our prediction files score to our results.

The rules, as evaluation.py applies them:
- classification (LaMP-1, 2): predictions and golds are `str(x).strip()`-ed and mapped to their index in the
  label list (-1 when absent); accuracy = share of equal indices; macro-F1 = sklearn's `f1_score(...,
  labels=range(len(labels)), average="macro")`: per label 2tp / (2tp + fp + fn), 0 for a label with no tp,
  fp or fn, averaged over the full label set (-1 is never a label).
- rating (LaMP-3): `float(pred)` after strip; a prediction that does not parse as a float becomes the end of
  the scale farther from the gold (1 when |1 - gold| > |5 - gold|, else 5); MAE and RMSE.
- generation (LaMP-4, 5, 7): ROUGE-1 and ROUGE-L F-measure of HF `evaluate`'s "rouge" over stripped texts:
  `rouge_score`'s default tokenizer (lowercase, every run of characters outside [a-z0-9] is a separator) and
  no stemmer. `evaluate` aggregates the per-query F-measures with rouge_score's BootstrapAggregator (the
  median of 1000 resampled means, a random estimate of the mean); we return the plain mean, the quantity
  that bootstrap estimates, so re-scoring is deterministic.
"""

from __future__ import annotations

import math
import re
from collections import Counter

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def _classification(golds: list[str], preds: list[str], labels: list[str]) -> dict[str, float]:
    index = {label: i for i, label in enumerate(labels)}
    g = [index.get(str(x).strip(), -1) for x in golds]
    p = [index.get(str(x).strip(), -1) for x in preds]
    accuracy = sum(a == b for a, b in zip(g, p, strict=True)) / len(g)
    f1s = []
    for label in range(len(labels)):
        tp = sum(a == label and b == label for a, b in zip(g, p, strict=True))
        fp = sum(a != label and b == label for a, b in zip(g, p, strict=True))
        fn = sum(a == label and b != label for a, b in zip(g, p, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": accuracy, "f1": sum(f1s) / len(f1s)}


def _rating_value(text: str, gold: float, low: int, high: int) -> float:
    try:
        return float(str(text).strip())
    except ValueError:
        return float(low) if abs(low - gold) > abs(high - gold) else float(high)


def _rating(golds: list[str], preds: list[str], scale: tuple[int, int]) -> dict[str, float]:
    low, high = scale
    g = [float(str(x).strip()) for x in golds]
    errors = [abs(_rating_value(p, y, low, high) - y) for p, y in zip(preds, g, strict=True)]
    return {
        "mae": sum(errors) / len(errors),
        "rmse": math.sqrt(sum(e * e for e in errors) / len(errors)),
    }


def _tokens(text: str) -> list[str]:
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def _f(overlap: int, n_pred: int, n_ref: int) -> float:
    if not n_pred or not n_ref:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def _rouge(golds: list[str], preds: list[str]) -> dict[str, float]:
    r1, rl = [], []
    for gold, pred in zip(golds, preds, strict=True):
        ref, hyp = _tokens(gold.strip()), _tokens(pred.strip())
        overlap = sum((Counter(ref) & Counter(hyp)).values())
        r1.append(_f(overlap, len(hyp), len(ref)))
        rl.append(_f(_lcs(ref, hyp), len(hyp), len(ref)))
    return {"rouge1": sum(r1) / len(r1), "rougeL": sum(rl) / len(rl)}


def score(
    task_type: str,
    golds: dict[str, str],
    preds: dict[str, str],
    labels: list[str] | None = None,
    scale: tuple[int, int] | None = None,
) -> dict[str, float]:
    """LaMP's metrics of `preds` (query id -> output) against `golds` (query id -> gold output).

    task_type: "classification" (needs `labels`) -> accuracy, f1; "rating" -> mae, rmse (`scale` defaults to
    LaMP-3's (1, 5)); "generation" -> rouge1, rougeL. Like LaMP's scorer, the two id sets must be equal.
    """
    if set(golds) != set(preds):
        missing, extra = sorted(set(golds) - set(preds)), sorted(set(preds) - set(golds))
        raise AssertionError(f"prediction ids and gold ids differ: missing {missing[:5]}, extra {extra[:5]}")
    if not golds:
        raise AssertionError("nothing to score")
    ids = sorted(golds)
    g, p = [golds[i] for i in ids], [preds[i] for i in ids]
    if task_type == "classification":
        if not labels:
            raise ValueError("classification needs the label set")
        return _classification(g, p, list(labels))
    if task_type == "rating":
        return _rating(g, p, scale or (1, 5))
    if task_type == "generation":
        return _rouge(g, p)
    raise ValueError(f"task_type={task_type!r}; use classification, rating or generation")
