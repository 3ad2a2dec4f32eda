"""Label-frequency baselines that any personalized model has to beat.

- majority: every query gets the most frequent label among all profile items pooled (no personalization).
- user_majority: every query gets its user's own most frequent profile label (personalization without text);
  ties go to the label more frequent in the pool (the server's users in a federated run: the server sends
  its `label_ranking`), then to the earlier label in the label set, so the result is deterministic. A user
  without history gets the majority label.
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


def label_ranking(task: TaskSpec, users: Sequence[User]) -> list[str]:
    """Every label of the task's label set by its frequency in the pooled profiles of `users`, most frequent
    first; ties (and labels nobody used) in label-set order. Its head is the majority label."""
    counts = profile_label_counts(task, users)
    if not counts:
        raise DataError("no profile items to count labels from")
    labels = list(task.labels) + sorted(set(counts) - set(task.labels))
    order = {label: i for i, label in enumerate(labels)}
    return sorted(labels, key=lambda label: (-counts[label], order[label]))


def majority_label(task: TaskSpec, users: Sequence[User]) -> str:
    return label_ranking(task, users)[0]


def user_majority_label(task: TaskSpec, user: User, ranking: Sequence[str]) -> str:
    """The user's own most frequent profile label; ties go to the label ranked higher in `ranking` (the
    pooled frequency, `label_ranking`), then to the earlier label in the label set. A user without history
    gets the ranking's head (the majority label)."""
    own = profile_label_counts(task, [user])
    if not own:
        return ranking[0] if ranking else ""
    place = {label: i for i, label in enumerate(ranking)}
    order = {label: i for i, label in enumerate(task.labels)}
    far = len(place) + len(order)
    return min(own, key=lambda label: (-own[label], place.get(label, far), order.get(label, far)))


def majority_predictions(dataset: Dataset, pool: Sequence[User] | None = None) -> dict[str, str]:
    """Query id -> the most frequent label of the pooled profiles of `pool` (default: all users)."""
    label = majority_label(dataset.task, pool if pool is not None else dataset.users)
    return {q.id: label for u in dataset.users for q in u.queries}


def user_majority_predictions(dataset: Dataset, pool: Sequence[User] | None = None) -> dict[str, str]:
    """Query id -> the user's own most frequent profile label (the pooled frequency of `pool` breaks ties)."""
    ranking = label_ranking(dataset.task, pool if pool is not None else dataset.users)
    predictions = {}
    for user in dataset.users:
        label = user_majority_label(dataset.task, user, ranking)
        predictions.update({q.id: label for q in user.queries})
    return predictions
