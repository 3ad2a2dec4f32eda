"""The official LaMP layout: `*_questions.json` + optional `*_outputs.json`.

Questions: `[{"id", "input", "profile": [{"id", ...}, ...]}, ...]`; outputs: `{"task", "golds": [{"id",
"output"}]}` (test sets ship without outputs, so golds are None). The user-based release gives every question
its own profile, so each question is its own user (id = question id). The time-based release, and
numpy-commit-tags, name the user (`user_id` or `user`); such questions are grouped and their profiles merged
by item id.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from proper_fed.data.jsonio import read_json, record_id
from proper_fed.data.task_spec import TaskSpec
from proper_fed.data.tasks import detect_task, find_task, refine_by_fields
from proper_fed.data.types import Dataset, ProfileItem, Query, User
from proper_fed.data.validate import check_same_ids, check_users, gold_map, merge_profile, profile_item
from proper_fed.errors import DataError

logger = logging.getLogger(__name__)

USER_KEYS = ("user_id", "user")


def outputs_path_for(questions: Path) -> Path | None:
    """`train_questions.json` -> `train_outputs.json` when it exists (only the same split pairs up)."""
    if "questions" not in questions.name:
        return None
    candidate = questions.with_name(questions.name.replace("questions", "outputs"))
    return candidate if candidate.is_file() else None


def _question(raw: Any, index: int, path: Path) -> tuple[str, str, str | None, list[ProfileItem]]:
    """Check one question record: (id, input, user key, profile items)."""
    if not isinstance(raw, dict):
        raise DataError(f"{path}: record {index} is a {type(raw).__name__}, expected an object")
    qid = record_id(raw.get("id"))
    if qid is None:
        raise DataError(
            f"{path}: record {index} has no usable 'id'; every question needs 'id', 'input', 'profile'"
        )
    where = f"{path}: record {index} (id {qid!r})"
    if not isinstance(raw.get("input"), str):
        raise DataError(
            f"{where}: missing or non-text 'input'; every question needs 'id', 'input', 'profile'"
        )
    profile = raw.get("profile")
    if not isinstance(profile, list):
        raise DataError(f"{where}: missing 'profile' list; every question needs 'id', 'input', 'profile'")
    user = next((record_id(raw[k]) for k in USER_KEYS if k in raw), None)
    items = [profile_item(p, f"{where}, profile[{j}]") for j, p in enumerate(profile)]
    return qid, raw["input"], user, items


def _resolve_task(
    task: TaskSpec | None, outputs: dict[str, Any] | None, opath: Path | None, inputs: list[str]
) -> TaskSpec:
    if task is not None:
        return task
    if outputs is not None and outputs.get("task") is not None:
        named = str(outputs["task"])
        found = find_task(named)
        if found is None:
            raise DataError(
                f"{opath}: unknown task {named!r}; pass --task with a known task or --spec with a TOML spec"
            )
        return found
    detected = detect_task(inputs)
    if detected is None:
        raise DataError(
            f"cannot tell the task of {opath or 'these questions'} (no outputs 'task' field and the question "
            "wording matches no known task); pass --task or --spec"
        )
    return detected


def load_lamp(
    questions: str | Path, outputs: str | Path | None = None, task: TaskSpec | None = None
) -> Dataset:
    """Load a LaMP questions file (and its outputs file, found next to it when not given)."""
    qpath = Path(questions)
    opath = Path(outputs) if outputs is not None else outputs_path_for(qpath)
    records = read_json(qpath)
    if not isinstance(records, list):
        raise DataError(f"{qpath}: expected a list of questions, got a {type(records).__name__}")
    if not records:
        raise DataError(f"{qpath}: no questions")
    parsed = [_question(r, i, qpath) for i, r in enumerate(records)]
    first_index: dict[str, int] = {}
    for index, (qid, *_rest) in enumerate(parsed):
        if qid in first_index:
            raise DataError(
                f"{qpath}: records {first_index[qid]} and {index}: question id {qid!r} appears twice; "
                "ids must be unique"
            )
        first_index[qid] = index

    outputs_doc = None
    golds: dict[str, str] | None = None
    if opath is not None:
        outputs_doc = read_json(opath)
        if not isinstance(outputs_doc, dict) or "golds" not in outputs_doc:
            raise DataError(f'{opath}: expected {{"task": ..., "golds": [...]}}')
        golds = gold_map(outputs_doc["golds"], str(opath))
        check_same_ids([p[0] for p in parsed], golds, str(qpath), str(opath))
    else:
        logger.info("%s: no outputs file, queries have no golds", qpath)

    spec = _resolve_task(task, outputs_doc, opath, [p[1] for p in parsed])
    keys = {k for _, _, _, items in parsed[:1] for it in items for k in it.fields}
    spec = refine_by_fields(spec, keys) if task is None else spec

    users = _group(parsed, golds, qpath)
    checked = check_users(spec, users, str(qpath))
    logger.info("%s: %d users, %d questions, task %s", qpath, len(checked), len(parsed), spec.name)
    return Dataset(task=spec, users=tuple(checked), source=str(qpath))


def _group(
    parsed: list[tuple[str, str, str | None, list[ProfileItem]]], golds: dict[str, str] | None, path: Path
) -> list[User]:
    """Questions -> users, in order of first appearance; a question without a user key is its own user."""
    profiles: dict[str, dict[str, ProfileItem]] = {}
    queries: dict[str, list[Query]] = {}
    for index, (qid, text, user, items) in enumerate(parsed):
        uid = user if user is not None else qid
        merge_profile(profiles.setdefault(uid, {}), items, f"{path}: record {index} (id {qid!r})")
        queries.setdefault(uid, []).append(Query(qid, text, None if golds is None else golds[qid]))
    return [User(uid, tuple(profiles[uid].values()), tuple(queries[uid])) for uid in profiles]
