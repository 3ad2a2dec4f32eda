"""Label-frequency baselines that any personalized model has to beat.

- majority: every query gets the most frequent label among all profile items pooled (no personalization).
- user_majority: every query gets its user's own most frequent profile label (personalization without text);
  ties go to the label more frequent overall, then to the earlier label in the label set, so the result is
  deterministic.
Both need labelled history, so they exist for classification and rating tasks whose profile items carry the
answer (not for generation tasks or LaMP-1).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from proper_fed.data.task_spec import TaskSpec
from proper_fed.data.types import Dataset, User
from proper_fed.errors import DataError


def has_label_baselines(task: TaskSpec) -> bool:
    return task.type != "generation" and task.profile_labelled


def _require(task: TaskSpec) -> None:
    if not has_label_baselines(task):
        raise DataError(f"task {task.name} has no labelled history, so label baselines do not apply")


def profile_label_counts(task: TaskSpec, users: Sequence[User]) -> Counter[str]:
    """Label frequencies over all profile items of `users` (items shared by users count once per user)."""
    _require(task)
    return Counter(task.profile_label(item, u.user_id) for u in users for item in u.profile)  # type: ignore[misc]


def _ranked(counts: Counter[str], task: TaskSpec, tiebreak: Counter[str] | None = None) -> str:
    order = {label: i for i, label in enumerate(task.labels)}
    tiebreak = tiebreak or Counter()
    return min(counts, key=lambda label: (-counts[label], -tiebreak[label], order.get(label, len(order))))


def majority_label(task: TaskSpec, users: Sequence[User]) -> str:
    counts = profile_label_counts(task, users)
    if not counts:
        raise DataError("no profile items to count labels from")
    return _ranked(counts, task)


def majority_predictions(dataset: Dataset, pool: Sequence[User] | None = None) -> dict[str, str]:
    """Query id -> the most frequent label of the pooled profiles of `pool` (default: all users)."""
    label = majority_label(dataset.task, pool if pool is not None else dataset.users)
    return {q.id: label for u in dataset.users for q in u.queries}


def user_majority_predictions(dataset: Dataset, pool: Sequence[User] | None = None) -> dict[str, str]:
    """Query id -> the user's own most frequent profile label (global frequency of `pool` breaks ties)."""
    task = dataset.task
    overall = profile_label_counts(task, pool if pool is not None else dataset.users)
    predictions = {}
    for user in dataset.users:
        own = profile_label_counts(task, [user])
        label = _ranked(own, task, overall) if own else _ranked(overall, task)
        predictions.update({q.id: label for q in user.queries})
    return predictions
