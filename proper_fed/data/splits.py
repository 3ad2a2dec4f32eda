"""Federation splits: which users the server may train on, and which stay on their devices.

Protocol (what may train where):
- Server users: their profile items train stages 1-2 (population, group); their queries are the server's
  validation set and never train anything.
- Device users: stage 3 trains on the user's own profile only; evaluation uses the user's own queries.
  Nothing of a device user reaches the server's training data.
- Leak guard: a profile item whose id or prompt text equals any query's (of any user) is dropped before
  training, so a query can never be trained on, even when a source repeats it inside a history (LaMP's
  time-based release can; identical commit messages can).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from proper_fed.data.example import Example
from proper_fed.data.task_spec import TaskSpec
from proper_fed.data.types import Dataset, ProfileItem, User
from proper_fed.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_SERVER_FRACTION = 0.5


@dataclass(frozen=True)
class FederationSplit:
    """Users partitioned between the server and the devices (disjoint, both non-empty)."""

    task: TaskSpec
    server_users: tuple[User, ...]
    device_users: tuple[User, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "server_users", tuple(self.server_users))
        object.__setattr__(self, "device_users", tuple(self.device_users))
        if not self.server_users or not self.device_users:
            raise ConfigError(
                f"a federation needs server and device users, got {len(self.server_users)} server and "
                f"{len(self.device_users)} device users; change server_fraction or the user list"
            )
        shared = {u.user_id for u in self.server_users} & {u.user_id for u in self.device_users}
        if shared:
            raise ConfigError(f"users on both sides of the split: {sorted(shared)[:5]}")


def _date_key(date: str) -> tuple[int, ...] | None:
    """LaMP's own recency retriever orders dates as `tuple(map(int, date.split("-")))`: years ("2011") and
    unpadded dates ("2013-4-9") included. None when the date is not of that form."""
    try:
        return tuple(int(part) for part in date.split("-"))
    except ValueError:
        return None


def _most_recent(profile: Sequence[ProfileItem], n: int) -> tuple[ProfileItem, ...]:
    # Sort by date when every item has one (as LaMP does, else as text); otherwise trust the source's
    # order, which LaMP and OPPU give oldest first.
    items = list(profile)
    if all("date" in it.fields for it in items):
        keys = [_date_key(it.fields["date"]) for it in items]
        if all(k is not None for k in keys):
            items = [it for _, it in sorted(zip(keys, items, strict=True), key=lambda pair: pair[0])]
        else:
            items.sort(key=lambda it: it.fields["date"])
    return tuple(items[-n:]) if n < len(items) else tuple(items)


def subset_dataset(
    dataset: Dataset,
    *,
    users: Sequence[str] | None = None,
    max_users: int | None = None,
    max_profile: int | None = None,
    seed: int = 0,
) -> Dataset:
    """A smaller dataset for quick runs: chosen users, a seeded sample of `max_users`, and at most
    `max_profile` most recent history items per user. Source order of users is kept."""
    kept = list(dataset.users)
    if users is not None:
        wanted = list(dict.fromkeys(users))
        known = {u.user_id for u in kept}
        unknown = [u for u in wanted if u not in known]
        if unknown:
            raise ConfigError(f"users not in {dataset.source or 'the dataset'}: {unknown[:5]}")
        chosen = set(wanted)
        kept = [u for u in kept if u.user_id in chosen]
    if max_users is not None:
        if max_users < 1:
            raise ConfigError(f"max_users = {max_users}; use a positive number or leave it unset")
        if max_users < len(kept):
            chosen = set(random.Random(seed).sample(sorted(u.user_id for u in kept), max_users))
            kept = [u for u in kept if u.user_id in chosen]
    if max_profile is not None:
        if max_profile < 1:
            raise ConfigError(f"max_profile = {max_profile}; use a positive number or leave it unset")
        kept = [replace(u, profile=_most_recent(u.profile, max_profile)) for u in kept]
    ids = {u.user_id for u in kept}
    server = tuple(uid for uid in dataset.server_user_ids if uid in ids)
    return replace(dataset, users=tuple(kept), server_user_ids=server)


def _drop_query_copies(task: TaskSpec, users: Sequence[User]) -> list[User]:
    query_ids = {q.id for u in users for q in u.queries}
    query_texts = {task.query_prompt(q) for u in users for q in u.queries}
    out, dropped = [], 0
    for user in users:
        keep = tuple(
            it
            for it in user.profile
            if it.id not in query_ids and task.profile_prompt(it, user.user_id) not in query_texts
        )
        dropped += len(user.profile) - len(keep)
        out.append(user if len(keep) == len(user.profile) else replace(user, profile=keep))
    if dropped:
        logger.warning("leak guard: dropped %d profile item(s) identical to a query", dropped)
    return out


def split_federation(
    dataset: Dataset,
    server_fraction: float | None = None,
    seed: int = 0,
    *,
    server_users: Sequence[str] | None = None,
    users: Sequence[str] | None = None,
    max_users: int | None = None,
    max_profile: int | None = None,
) -> FederationSplit:
    """Split users between server and devices, deterministically for a seed.

    server_users: explicit server user ids (the rest are devices); otherwise the dataset's own split
        (OPPU's user_others) when server_fraction is None and the source has one; otherwise a seeded random
        `server_fraction` (default 0.5) of users, at least one on each side.
    users / max_users / max_profile: subset first (see `subset_dataset`).
    """
    data = subset_dataset(dataset, users=users, max_users=max_users, max_profile=max_profile, seed=seed)
    all_users = _drop_query_copies(data.task, data.users)
    ids = [u.user_id for u in all_users]
    if server_users is not None:
        unknown = set(server_users) - set(ids)
        if unknown:
            raise ConfigError(f"server_users not in the dataset: {sorted(unknown)[:5]}")
        server_ids = set(server_users)
    elif server_fraction is None and data.server_user_ids:
        server_ids = set(data.server_user_ids)
    else:
        fraction = DEFAULT_SERVER_FRACTION if server_fraction is None else server_fraction
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"server_fraction = {fraction}; use a value strictly between 0 and 1")
        if len(ids) < 2:
            raise ConfigError(f"{len(ids)} user(s) cannot be split between server and devices; need >= 2")
        n_server = min(max(round(fraction * len(ids)), 1), len(ids) - 1)
        shuffled = sorted(ids)  # sort first: the split must not depend on file order, only on the seed
        random.Random(seed).shuffle(shuffled)
        server_ids = set(shuffled[:n_server])
    split = FederationSplit(
        task=data.task,
        server_users=tuple(u for u in all_users if u.user_id in server_ids),
        device_users=tuple(u for u in all_users if u.user_id not in server_ids),
        seed=seed,
    )
    logger.info("split: %d server users, %d device users", len(split.server_users), len(split.device_users))
    return split


def validation_split(split: FederationSplit, server_fraction: float) -> FederationSplit:
    """The split for choosing settings: the device users left out entirely, the server's users split again
    (seeded as the run), a `server_fraction` share training stages 1-2 and the others playing the devices."""
    if len(split.server_users) < 2:
        raise ConfigError(
            f"validation needs >= 2 server users to split into server and validation devices; the run has "
            f"{len(split.server_users)}: raise server-fraction or max-users"
        )
    ids = sorted(u.user_id for u in split.server_users)
    random.Random(split.seed).shuffle(ids)
    n_server = min(max(round(server_fraction * len(ids)), 1), len(ids) - 1)
    keep = set(ids[:n_server])
    logger.info("validation split: %d server users, %d validation devices", n_server, len(ids) - n_server)
    return FederationSplit(
        task=split.task,
        server_users=tuple(u for u in split.server_users if u.user_id in keep),
        device_users=tuple(u for u in split.server_users if u.user_id not in keep),
        seed=split.seed,
    )


def server_training_examples(split: FederationSplit) -> list[Example]:
    """Stages 1-2: the server users' profile items."""
    return [split.task.profile_to_example(u, it) for u in split.server_users for it in u.profile]


def server_validation_examples(split: FederationSplit) -> list[Example]:
    """The server users' queries that have a gold: validation for stages 1-2, never training."""
    return [
        split.task.query_to_example(u, q) for u in split.server_users for q in u.queries if q.gold is not None
    ]


def device_training_examples(task: TaskSpec, user: User) -> list[Example]:
    """Stage 3 on a device: the user's own profile items only."""
    return [task.profile_to_example(user, it) for it in user.profile]


def device_eval_examples(task: TaskSpec, user: User) -> list[Example]:
    """The user's own queries that have a gold (queries without one cannot be scored)."""
    return [task.query_to_example(user, q) for q in user.queries if q.gold is not None]
