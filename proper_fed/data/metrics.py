"""Metrics as the official LaMP scorer computes them, plus per-user and per-history-length breakdowns.

Official scorer (LaMP `eval/evaluation.py`, also used by OPPU):
- LaMP-1, 2: predictions and golds are stripped and mapped to their index in the task's label list (-1 when
  absent); accuracy, and sklearn macro-F1 with `labels=` the full label list, so a label no one predicted
  and no gold has scores 0 and still counts in the mean, and a prediction outside the set (-1) is simply
  wrong.
- LaMP-3: MAE and RMSE over floats; a prediction that is not a number becomes whichever of 1 and 5 is
  farther from the gold (ties -> 5).
- LaMP-4, 5, 6, 7: ROUGE-1 and ROUGE-L F-measure from HF `evaluate`'s "rouge", i.e. `rouge_score` with its
  default tokenizer and *no* stemmer. `evaluate` aggregates with a bootstrap (median of resampled means);
  we report the plain mean, which is what the bootstrap estimates, without its sampling noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from proper_fed.errors import DataError

if TYPE_CHECKING:
    from proper_fed.data.task_spec import TaskSpec
    from proper_fed.data.types import User

Prediction = str | int | float | None
K = TypeVar("K")  # whatever identifies a user in a cohort table (user id, node id)


def _check_lengths(preds: Sequence[object], golds: Sequence[object]) -> None:
    if len(preds) != len(golds):
        raise DataError(f"{len(preds)} predictions for {len(golds)} golds; give one prediction per gold")
    if not golds:
        raise DataError("nothing to score: no golds")


def classification_metrics(
    preds: Sequence[Prediction], golds: Sequence[str], labels: Sequence[str]
) -> dict[str, float]:
    """Accuracy and macro-F1 over the full label set, exactly as the official scorer (exact string match)."""
    from sklearn.metrics import f1_score  # sklearn import is slow; only scoring needs it

    _check_lengths(preds, golds)
    index = {label: i for i, label in enumerate(labels)}
    p = [index.get(str(x).strip(), -1) for x in preds]
    g = [index.get(str(y).strip(), -1) for y in golds]
    accuracy = sum(a == b for a, b in zip(p, g, strict=True)) / len(g)
    f1 = f1_score(g, p, labels=list(range(len(labels))), average="macro", zero_division=0)
    return {"accuracy": float(accuracy), "f1": float(f1)}


def _rating_value(pred: Prediction, gold: float, low: int, high: int) -> float:
    try:
        return float(str(pred).strip())
    except ValueError:
        # The official rule: an unparseable answer is as wrong as an answer in range can be.
        return float(low) if abs(low - gold) > abs(high - gold) else float(high)


def rating_metrics(
    preds: Sequence[Prediction], golds: Sequence[str | int | float], scale: tuple[int, int] = (1, 5)
) -> dict[str, float]:
    """MAE and RMSE; a prediction that is not a number counts as the farther end of `scale` from the gold."""
    _check_lengths(preds, golds)
    low, high = scale
    g = [float(str(y).strip()) for y in golds]
    p = [_rating_value(x, y, low, high) for x, y in zip(preds, g, strict=True)]
    errors = np.abs(np.asarray(p) - np.asarray(g))
    return {"mae": float(errors.mean()), "rmse": float(math.sqrt(float((errors**2).mean())))}


@lru_cache(maxsize=1)
def _rouge_scorer():  # noqa: ANN202 - rouge_score has no type hints
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def rouge_metrics(preds: Sequence[Prediction], golds: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure (rouge_score, no stemmer, as HF evaluate's default)."""
    _check_lengths(preds, golds)
    scorer = _rouge_scorer()
    r1, rl = [], []
    for pred, gold in zip(preds, golds, strict=True):
        score = scorer.score(str(gold).strip(), "" if pred is None else str(pred).strip())
        r1.append(score["rouge1"].fmeasure)
        rl.append(score["rougeL"].fmeasure)
    return {"rouge1": float(np.mean(r1)), "rougeL": float(np.mean(rl))}


# --- breakdowns over users -------------------------------------------------------------------------------


def _scored_pairs(
    task: TaskSpec, users: Sequence[User], predictions: Mapping[str, str]
) -> list[tuple[User, list[Prediction], list[str]]]:
    """Per user: parsed predictions and golds of the queries that have a gold."""
    out = []
    for user in users:
        preds, golds = [], []
        for query in user.queries:
            if query.gold is None:
                continue
            if query.id not in predictions:
                raise DataError(
                    f"no prediction for query {query.id!r} of user {user.user_id!r}; "
                    "predict every query that has a gold"
                )
            preds.append(task.parse_output(predictions[query.id]))
            golds.append(query.gold)
        if golds:
            out.append((user, preds, golds))
    return out


def evaluate_predictions(
    task: TaskSpec, users: Sequence[User], predictions: Mapping[str, str]
) -> dict[str, float]:
    """Pooled metrics over all queries with a gold; `predictions` maps query id to the model's raw text."""
    pairs = _scored_pairs(task, users, predictions)
    preds = [p for _, ps, _ in pairs for p in ps]
    golds = [g for _, _, gs in pairs for g in gs]
    return task.metrics(preds, golds)


def per_user_metrics(
    task: TaskSpec, users: Sequence[User], predictions: Mapping[str, str]
) -> dict[str, dict[str, float]]:
    """Metrics of each user's own queries (users without golds are left out)."""
    return {user.user_id: task.metrics(ps, gs) for user, ps, gs in _scored_pairs(task, users, predictions)}


def _cohort_label(index: int, sizes: Sequence[int]) -> str:
    low, high = min(sizes), max(sizes)
    span = f"{low}" if low == high else f"{low}-{high}"
    return f"Q{index + 1} ({span} item{'' if span == '1' else 's'})"


def _cohort_buckets(history: Mapping[K, int], n_cohorts: int) -> list[tuple[str, list[K]]]:
    """(label, keys) of each non-empty cohort, in order; keys keep their order in `history`."""
    if n_cohorts < 1:
        raise DataError(f"n_cohorts must be >= 1, got {n_cohorts}")
    if not history:
        return []
    sizes = np.array(list(history.values()))
    cuts = np.quantile(sizes, [i / n_cohorts for i in range(1, n_cohorts)])
    buckets: list[list[K]] = [[] for _ in range(n_cohorts)]
    for key, size in history.items():
        buckets[int(np.searchsorted(cuts, size, side="left"))].append(key)
    return [(_cohort_label(i, [history[k] for k in b]), b) for i, b in enumerate(buckets) if b]


def cohort_labels(history: Mapping[K, int], n_cohorts: int = 4) -> dict[K, str]:
    """Each key's history-length cohort: the one rule of every cohort table (the data tools' and a federated
    run's results.json).

    Cut points are the 1/n, 2/n, ... quantiles of history size; a size equal to a cut point goes to the lower
    cohort, so equal histories always share a cohort (cohorts can be uneven or empty; empty ones get no
    label). Labels show the actual range, e.g. "Q1 (3-7 items)".
    """
    return {key: label for label, keys in _cohort_buckets(history, n_cohorts) for key in keys}


def history_cohorts(users: Sequence[User], n_cohorts: int = 4) -> dict[str, list[User]]:
    """Users grouped by history length (the rule of `cohort_labels`), cohorts in order."""
    buckets = _cohort_buckets({i: len(u.profile) for i, u in enumerate(users)}, n_cohorts)
    return {label: [users[i] for i in keys] for label, keys in buckets}


def cohort_metrics(
    task: TaskSpec, users: Sequence[User], predictions: Mapping[str, str], n_cohorts: int = 4
) -> dict[str, dict[str, float]]:
    """Pooled metrics per history-length cohort, with the cohort's number of users and scored queries."""
    scored = {user.user_id for user, _, _ in _scored_pairs(task, users, predictions)}
    result: dict[str, dict[str, float]] = {}
    for label, members in history_cohorts([u for u in users if u.user_id in scored], n_cohorts).items():
        metrics = evaluate_predictions(task, members, predictions)
        n_queries = sum(1 for u in members for q in u.queries if q.gold is not None)
        result[label] = {**metrics, "users": float(len(members)), "queries": float(n_queries)}
    return result
