"""The normalized form every layout loads into: a dataset is a task plus users, each with history and queries.

LaMP's questions files repeat a user's history inside every question; OPPU's files list users. Both become
`Dataset(task, users)` here, so the training stages never see a file layout. Construction raises DataError
(loaders check first and give the file and record; these checks catch code that builds objects directly).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proper_fed.errors import DataError

if TYPE_CHECKING:
    from proper_fed.data.task_spec import TaskSpec


@dataclass(frozen=True)
class ProfileItem:
    """One past behaviour of a user (a tagged movie, a review, a commit).

    id: unique within the user's history.
    fields: the item's keys as strings (e.g. {"description": ..., "tag": ...}); the task spec says which key
        is the input and which the output.
    """

    id: str
    fields: Mapping[str, str]

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise DataError(f"ProfileItem.id must be a non-empty string, got {self.id!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.fields.items()):
            raise DataError(f"ProfileItem {self.id!r}: fields must map str to str")


@dataclass(frozen=True)
class Query:
    """A held-out question for a user.

    id: the question id (unique in the dataset).
    input: the question text as the source wrote it (LaMP's `input`, already a full prompt).
    gold: the expected output; None when the source has no golds (LaMP test sets).
    """

    id: str
    input: str
    gold: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise DataError(f"Query.id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.input, str):
            raise DataError(f"Query {self.id!r}: input must be a string")


@dataclass(frozen=True)
class User:
    """A user: their history (oldest first, as the source lists it) and their held-out queries."""

    user_id: str
    profile: tuple[ProfileItem, ...]
    queries: tuple[Query, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.user_id, str) or not self.user_id:
            raise DataError(f"User.user_id must be a non-empty string, got {self.user_id!r}")
        # Accept lists from callers but store tuples so a User cannot change after validation.
        object.__setattr__(self, "profile", tuple(self.profile))
        object.__setattr__(self, "queries", tuple(self.queries))


@dataclass(frozen=True)
class Dataset:
    """A task and its users.

    task: the TaskSpec that turns items and queries into prompts and scores predictions.
    users: in source order.
    source: where it was loaded from (for messages and reports).
    server_user_ids: users the source itself designates as server-side (OPPU's `user_others.json`);
        empty when the source has no such split. `split_federation` uses it unless told otherwise.
    """

    task: TaskSpec
    users: tuple[User, ...]
    source: str = ""
    server_user_ids: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "users", tuple(self.users))
        object.__setattr__(self, "server_user_ids", tuple(self.server_user_ids))
        seen: set[str] = set()
        for user in self.users:
            if user.user_id in seen:
                raise DataError(f"duplicate user id {user.user_id!r} in dataset {self.source!r}")
            seen.add(user.user_id)
        unknown = set(self.server_user_ids) - seen
        if unknown:
            raise DataError(f"server_user_ids name users not in the dataset: {sorted(unknown)[:5]}")

    @property
    def queries(self) -> list[Query]:
        return [q for u in self.users for q in u.queries]

    def user(self, user_id: str) -> User:
        for u in self.users:
            if u.user_id == user_id:
                return u
        raise KeyError(user_id)
