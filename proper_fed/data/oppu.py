"""OPPU's processed per-user layout (github.com/TamSiuhin/OPPU, `data/<task_name>/`).

`user_others.json` (users OPPU trains its base task LoRA on) and `user_top_100_history.json` (the 100 users
with the longest history, whom OPPU personalizes and tests) are lists of
`{"user_id", "profile": [...], "query": [{"id", "input", "gold"}]}`. Golds may sit in the query (under
"gold", "output" or "label") or in `<file stem>_label.json` (`{"task", "golds": [{"id", "output"}]}`).
`user_others` users are marked as server-side (`Dataset.server_user_ids`), matching OPPU's own protocol.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from proper_fed.data.jsonio import field_text, read_json, record_id
from proper_fed.data.task_spec import TaskSpec
from proper_fed.data.tasks import detect_task, find_task, refine_by_fields
from proper_fed.data.types import Dataset, ProfileItem, Query, User
from proper_fed.data.validate import check_users, gold_map, merge_profile, profile_item
from proper_fed.errors import DataError

logger = logging.getLogger(__name__)

SERVER_FILE = "user_others.json"
DEVICE_FILE = "user_top_100_history.json"
OPPU_FILES = (SERVER_FILE, DEVICE_FILE)
GOLD_KEYS = ("gold", "output", "label")


def is_oppu_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in OPPU_FILES)


def _label_file(path: Path) -> Path | None:
    candidate = path.with_name(f"{path.stem}_label.json")
    return candidate if candidate.is_file() else None


def _query(raw: Any, where: str, golds: dict[str, str] | None, gpath: Path | None) -> Query:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a query must be an object with 'id' and 'input'")
    qid = record_id(raw.get("id"))
    if qid is None or not isinstance(raw.get("input"), str):
        raise DataError(f"{where}: a query needs an 'id' and a text 'input'")
    inline = next((field_text(raw[k]) for k in GOLD_KEYS if raw.get(k) is not None), None)
    from_file = golds.get(qid) if golds is not None else None
    if inline is not None and from_file is not None and inline.strip() != from_file.strip():
        raise DataError(
            f"{where} (query {qid!r}): gold {inline!r} disagrees with {gpath} ({from_file!r}); "
            "keep one source"
        )
    return Query(qid, raw["input"], inline if inline is not None else from_file)


def _users(path: Path) -> tuple[list[User], str | None]:
    """Users of one OPPU file, and the task named by its label file (if any)."""
    records = read_json(path)
    if not isinstance(records, list):
        raise DataError(f'{path}: expected a list of users {{"user_id", "profile", "query"}}')
    gpath = _label_file(path)
    label_doc = read_json(gpath) if gpath is not None else None
    golds = None
    if label_doc is not None:
        if not isinstance(label_doc, dict) or "golds" not in label_doc:
            raise DataError(f'{gpath}: expected {{"task": ..., "golds": [...]}}')
        golds = gold_map(label_doc["golds"], str(gpath))
    users = []
    for i, raw in enumerate(records):
        if not isinstance(raw, dict):
            raise DataError(f"{path}: record {i} is a {type(raw).__name__}, expected a user object")
        uid = record_id(raw.get("user_id"))
        if uid is None:
            uid = f"{path.stem}-{i}"  # OPPU's files are lists; the index is the user's identity there
        where = f"{path}: record {i} (user {uid!r})"
        if not isinstance(raw.get("profile"), list) or not isinstance(raw.get("query"), list):
            raise DataError(f"{where}: a user needs a 'profile' list and a 'query' list")
        profile: dict[str, ProfileItem] = {}
        items = [profile_item(p, f"{where}, profile[{j}]") for j, p in enumerate(raw["profile"])]
        merge_profile(profile, items, where)
        queries = [_query(q, f"{where}, query[{j}]", golds, gpath) for j, q in enumerate(raw["query"])]
        users.append(User(uid, tuple(profile.values()), tuple(queries)))
    if golds is not None:
        unknown = set(golds) - {q.id for u in users for q in u.queries}
        if unknown:
            raise DataError(
                f"{gpath}: {len(unknown)} gold(s) match no query in {path} (e.g. {sorted(unknown)[:3]})"
            )
    task_name = str(label_doc["task"]) if label_doc is not None and label_doc.get("task") else None
    return users, task_name


def load_oppu(path: str | Path, task: TaskSpec | None = None) -> Dataset:
    """Load an OPPU task folder (or one of its two files)."""
    path = Path(path)
    files = [path / n for n in OPPU_FILES if (path / n).is_file()] if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no {' or '.join(OPPU_FILES)} in this folder")
    users: list[User] = []
    server: list[str] = []
    named: str | None = None
    for file in files:
        file_users, file_task = _users(file)
        named = named or file_task
        if file.name == SERVER_FILE:
            server.extend(u.user_id for u in file_users)
        users.extend(file_users)
    seen: set[str] = set()
    for user in users:
        if user.user_id in seen:
            raise DataError(
                f"{path}: user id {user.user_id!r} appears twice across {[f.name for f in files]}"
            )
        seen.add(user.user_id)

    folder = path if path.is_dir() else path.parent
    spec = task
    if spec is None:
        for candidate in (named, folder.name):
            spec = find_task(candidate) if candidate else None
            if spec is not None:
                break
        spec = spec or detect_task(q.input for u in users for q in u.queries)
        if spec is None:
            raise DataError(
                f"cannot tell the task of {path} (folder name, label file and question wording match no "
                "known task); pass --task or --spec"
            )
        spec = refine_by_fields(spec, {k for u in users[:1] for it in u.profile for k in it.fields})
    checked = check_users(spec, users, str(path))
    logger.info("%s: %d users (%d server-side), task %s", path, len(checked), len(server), spec.name)
    return Dataset(task=spec, users=tuple(checked), source=str(path), server_user_ids=tuple(server))
