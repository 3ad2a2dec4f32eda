"""Federation splits are deterministic, disjoint, and no device query reaches any training set."""

from dataclasses import replace
from pathlib import Path

import pytest

from proper_fed.data import (
    SyntheticConfig,
    device_eval_examples,
    device_training_examples,
    generate_synthetic,
    load_dataset,
    server_training_examples,
    server_validation_examples,
    split_federation,
    subset_dataset,
)
from proper_fed.data.types import ProfileItem, User
from proper_fed.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
NUMPY = Path(__file__).parents[2] / "shared" / "data" / "numpy-commit-tags" / "questions.json"


@pytest.fixture(scope="module")
def synthetic():
    return generate_synthetic(SyntheticConfig(users=30, seed=3)).dataset


def _ids(users):
    return [u.user_id for u in users]


def test_split_is_deterministic_by_seed(synthetic):
    a, b = split_federation(synthetic, 0.5, seed=1), split_federation(synthetic, 0.5, seed=1)
    assert _ids(a.server_users) == _ids(b.server_users)
    c = split_federation(synthetic, 0.5, seed=2)
    assert _ids(a.server_users) != _ids(c.server_users)


def test_split_partitions_users_by_fraction(synthetic):
    split = split_federation(synthetic, 0.3, seed=0)
    server, device = set(_ids(split.server_users)), set(_ids(split.device_users))
    assert not server & device and server | device == set(_ids(synthetic.users))
    assert len(server) == 9


def test_split_does_not_depend_on_file_order(synthetic):
    shuffled = replace(synthetic, users=tuple(reversed(synthetic.users)))
    assert set(_ids(split_federation(shuffled, seed=4).server_users)) == set(
        _ids(split_federation(synthetic, seed=4).server_users)
    )


def _assert_leak_free(split):
    task = split.task
    training = server_training_examples(split) + [
        ex for u in split.device_users for ex in device_training_examples(task, u)
    ]
    training_prompts = {ex.prompt for ex in training}
    training_item_ids = {it.id for u in (*split.server_users, *split.device_users) for it in u.profile}
    for user in split.device_users:
        for query in user.queries:
            assert query.id not in training_item_ids
            assert task.query_prompt(query) not in training_prompts
    server_validation = {ex.prompt for ex in server_validation_examples(split)}
    assert not server_validation & training_prompts


def test_no_device_query_appears_in_any_training_set(synthetic):
    _assert_leak_free(split_federation(synthetic, 0.5, seed=0))


def test_leak_guard_drops_history_items_that_copy_a_query(synthetic):
    # Plant a device user's query (same id, same text) into another user's history and their own.
    split = split_federation(synthetic, 0.5, seed=0)
    victim = split.device_users[0]
    query = victim.queries[0]
    text = query.input.split(": ", 1)[1]  # "React with one of <labels>: <text>"
    copy = ProfileItem(query.id, {"text": text, "label": query.gold})
    same_text = ProfileItem("other-id", {"text": text, "label": query.gold})
    users = [
        replace(u, profile=(*u.profile, copy, same_text))
        if u.user_id != victim.user_id
        else replace(u, profile=(*u.profile, same_text))
        for u in synthetic.users
    ]
    planted = replace(synthetic, users=tuple(users))
    _assert_leak_free(split_federation(planted, 0.5, seed=0))


def test_numpy_commit_tags_split_is_leak_free():
    if not NUMPY.is_file():
        pytest.skip(f"numpy-commit-tags not found at {NUMPY}")
    _assert_leak_free(split_federation(load_dataset(NUMPY), 0.5, seed=0, max_profile=50))


def test_device_examples_are_the_users_own(synthetic):
    split = split_federation(synthetic, seed=0)
    user = split.device_users[0]
    train = device_training_examples(split.task, user)
    evals = device_eval_examples(split.task, user)
    assert len(train) == len(user.profile) and len(evals) == len(user.queries)
    assert {ex.user_id for ex in train + evals} == {user.user_id}
    assert [ex.target for ex in evals] == [q.gold for q in user.queries]


def test_subset_options(synthetic):
    small = subset_dataset(synthetic, max_users=5, max_profile=3, seed=0)
    assert len(small.users) == 5 and all(len(u.profile) <= 3 for u in small.users)
    kept = small.users[0]
    full = synthetic.user(kept.user_id)
    assert kept.profile == full.profile[-len(kept.profile) :]  # the most recent items
    assert _ids(subset_dataset(synthetic, users=["u002", "u001"]).users) == ["u001", "u002"]
    assert _ids(subset_dataset(synthetic, max_users=5, seed=0).users) == _ids(small.users)
    with pytest.raises(ConfigError, match="not in"):
        subset_dataset(synthetic, users=["nobody"])


def test_max_profile_keeps_latest_dates():
    items = (
        ProfileItem("a", {"text": "x", "label": "like", "date": "2024-05-01"}),
        ProfileItem("b", {"text": "y", "label": "like", "date": "2023-01-01"}),
        ProfileItem("c", {"text": "z", "label": "like", "date": "2024-01-01"}),
    )
    ds = generate_synthetic(SyntheticConfig(users=2, groups=2)).dataset
    ds = replace(ds, users=(replace(ds.users[0], profile=items), ds.users[1]))
    assert [it.id for it in subset_dataset(ds, max_profile=2).users[0].profile] == ["c", "a"]


def test_oppu_source_split_is_used_by_default():
    ds = load_dataset(FIXTURES / "oppu" / "movie_tagging")
    split = split_federation(ds)
    assert _ids(split.server_users) == ["o1", "o2"] and _ids(split.device_users) == ["d1"]
    assert _ids(split_federation(ds, server_users=["d1"]).server_users) == ["d1"]


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5])
def test_bad_fraction_is_a_config_error(synthetic, fraction):
    with pytest.raises(ConfigError, match="server_fraction"):
        split_federation(synthetic, fraction)


def test_split_needs_users_on_both_sides():
    one = generate_synthetic(SyntheticConfig(users=2, groups=2)).dataset
    one = replace(one, users=one.users[:1])
    with pytest.raises(ConfigError, match="need >= 2"):
        split_federation(one)
    assert isinstance(one.users[0], User)


def test_a_validation_run_never_sees_the_device_users():
    from proper_fed.federation.run_settings import RunSettings, load_split

    s = RunSettings(data="synthetic", server_fraction=0.5)
    real = load_split(s)
    val = load_split(RunSettings(data="synthetic", server_fraction=0.5, validation=True))
    real_devices = {u.user_id for u in real.device_users}
    val_users = {u.user_id for u in (*val.server_users, *val.device_users)}
    assert val_users == {u.user_id for u in real.server_users}  # only the real run's server users
    assert not val_users & real_devices
    assert val.server_users and val.device_users
    assert len(val.server_users) == round(0.5 * len(real.server_users))
    # the same settings give the same split (every process of a run must agree)
    again = load_split(RunSettings(data="synthetic", server_fraction=0.5, validation=True))
    assert [u.user_id for u in again.device_users] == [u.user_id for u in val.device_users]
