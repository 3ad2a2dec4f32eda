"""Dataset statistics for `proper-fed data inspect`: sizes, history-length spread, labels, baselines.

Returns a dataclass (JSON-ready via `to_dict`); printing is the CLI's job.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from proper_fed.data.baselines import (
    has_label_baselines,
    majority_label,
    majority_predictions,
    profile_label_counts,
    user_majority_predictions,
)
from proper_fed.data.metrics import evaluate_predictions
from proper_fed.data.types import Dataset

PERCENTILES = (10, 25, 50, 75, 90)


def spread(values: list[int]) -> dict[str, float]:
    """min, p10, p25, p50, p75, p90, max and mean (linear-interpolated percentiles, as numpy's default)."""
    if not values:
        return {}
    array = np.asarray(values, dtype=float)
    out = {"min": float(array.min())}
    out.update({f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES})
    out.update({"max": float(array.max()), "mean": float(array.mean())})
    return out


@dataclass(frozen=True)
class DatasetStats:
    """What `data inspect` reports.

    server_users: users the source itself puts on the server side (OPPU's user_others), else 0.
    items_per_user / queries_per_user: `spread` of per-user counts.
    profile_labels / gold_labels: label -> count, in label-set order (empty for generation tasks).
    baselines: name -> {"label": ... (majority only), metric: value}, scored on the queries; empty when the
        task has no labelled history or the queries have no golds.
    """

    source: str
    task: str
    task_type: str
    users: int
    server_users: int
    queries: int
    queries_with_gold: int
    profile_items: int
    items_per_user: dict[str, float]
    queries_per_user: dict[str, float]
    profile_labels: dict[str, int]
    gold_labels: dict[str, int]
    baselines: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ordered(counts: Counter[str], labels: tuple[str, ...]) -> dict[str, int]:
    # Most frequent first; labels the data never uses still appear (with 0) so absent classes are visible.
    order = {label: i for i, label in enumerate(labels)}
    keys = sorted(set(labels) | set(counts), key=lambda k: (-counts[k], order.get(k, len(order)), k))
    return {k: counts[k] for k in keys}


def inspect_dataset(dataset: Dataset) -> DatasetStats:
    task = dataset.task
    users = dataset.users
    queries = dataset.queries
    labelled = has_label_baselines(task)
    gold_counts: Counter[str] = Counter(q.gold for q in queries if q.gold is not None)
    baselines: dict[str, dict[str, Any]] = {}
    with_gold = sum(1 for q in queries if q.gold is not None)
    if labelled and with_gold:
        baselines["majority"] = {
            "label": majority_label(task, users),
            **evaluate_predictions(task, users, majority_predictions(dataset)),
        }
        baselines["user_majority"] = evaluate_predictions(task, users, user_majority_predictions(dataset))
    return DatasetStats(
        source=dataset.source,
        task=task.name,
        task_type=task.type,
        users=len(users),
        server_users=len(dataset.server_user_ids),
        queries=len(queries),
        queries_with_gold=with_gold,
        profile_items=sum(len(u.profile) for u in users),
        items_per_user=spread([len(u.profile) for u in users]),
        queries_per_user=spread([len(u.queries) for u in users]),
        profile_labels=_ordered(profile_label_counts(task, users), task.labels) if labelled else {},
        gold_labels=_ordered(gold_counts, task.labels) if task.type != "generation" else {},
        baselines=baselines,
    )
