"""Checks every layout shares once it is in normalized form: the data must fit the task.

Loaders check the file structure (they know the file and record index); this module checks meaning:
non-empty histories, the keys the task's prompts need, labels inside the label set, unique query ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from proper_fed.data.jsonio import field_text, record_id
from proper_fed.data.task_spec import TaskSpec
from proper_fed.data.types import ProfileItem, Query, User
from proper_fed.errors import DataError


def profile_item(raw: Any, where: str) -> ProfileItem:
    """One raw profile entry -> ProfileItem; `where` names file, record and index for the message."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a profile item must be an object with an 'id', got {type(raw).__name__}")
    item_id = record_id(raw.get("id"))
    if item_id is None:
        raise DataError(
            f"{where}: profile item has no usable 'id' (got {raw.get('id')!r}); give every item an id"
        )
    fields = {}
    for key, value in raw.items():
        text = field_text(value)
        if key != "id" and text is not None:
            fields[str(key)] = text
    return ProfileItem(item_id, fields)


def merge_profile(target: dict[str, ProfileItem], items: Iterable[ProfileItem], where: str) -> None:
    """Add items by id: a repeat with the same content is dropped, a repeat with other content is an error."""
    for item in items:
        seen = target.get(item.id)
        if seen is None:
            target[item.id] = item
        elif dict(seen.fields) != dict(item.fields):
            raise DataError(
                f"{where}: profile item id {item.id!r} appears twice with different content; ids must be "
                "unique per user (fix the ids or drop the duplicate)"
            )


def check_users(task: TaskSpec, users: Iterable[User], source: str) -> list[User]:
    """Validate users against the task and return them with golds in the label set's spelling."""
    out: list[User] = []
    query_ids: dict[str, str] = {}
    for user in users:
        where = f"{source}: user {user.user_id!r}"
        if not user.profile:
            raise DataError(
                f"{where} has an empty profile; every user needs at least one history item "
                "(drop the user's questions or add history)"
            )
        for item in user.profile:
            task.profile_prompt(item, user.user_id)  # raises DataError naming missing keys
            task.profile_label(item, user.user_id)  # raises DataError for labels outside the set
        queries = []
        for query in user.queries:
            if query.id in query_ids:
                raise DataError(
                    f"{source}: question id {query.id!r} appears twice (users {query_ids[query.id]!r} and "
                    f"{user.user_id!r}); question ids must be unique"
                )
            query_ids[query.id] = user.user_id
            queries.append(_check_gold(task, query, where))
        out.append(replace(user, queries=tuple(queries)))
    return out


def _check_gold(task: TaskSpec, query: Query, where: str) -> Query:
    if query.gold is None or task.type == "generation":
        return query
    label = task.canonical(query.gold)
    if label is None:
        raise DataError(
            f"{where}: gold of question {query.id!r} is {query.gold!r}, not in the label set of {task.name} "
            f"({task.labels_text}); fix the gold or the spec's labels"
        )
    return replace(query, gold=label)


def gold_map(golds: Any, path: str) -> dict[str, str]:
    """LaMP's `golds` list -> {id: output}; duplicates and malformed entries are errors."""
    if not isinstance(golds, list):
        raise DataError(f'{path}: \'golds\' must be a list of {{"id", "output"}} objects')
    out: dict[str, str] = {}
    for i, entry in enumerate(golds):
        gid = record_id(entry.get("id")) if isinstance(entry, dict) else None
        if gid is None:
            raise DataError(
                f'{path}: golds[{i}] has no usable \'id\'; each gold is {{"id": ..., "output": ...}}'
            )
        output = field_text(entry.get("output"))
        if output is None:
            raise DataError(f"{path}: golds[{i}] (id {gid!r}) has no 'output'")
        if gid in out:
            raise DataError(f"{path}: gold id {gid!r} appears twice (golds[{i}]); ids must be unique")
        out[gid] = output
    return out


def check_same_ids(question_ids: Iterable[str], golds: Mapping[str, str], qpath: str, gpath: str) -> None:
    """Every question needs exactly one gold and every gold a question, as the official scorer asserts."""
    qids = set(question_ids)
    missing, extra = sorted(qids - set(golds)), sorted(set(golds) - qids)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} question(s) without a gold (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} gold(s) without a question (e.g. {extra[:3]})")
        raise DataError(
            f"{qpath} and {gpath} do not match: {'; '.join(parts)}; use the outputs file of the same split"
        )
