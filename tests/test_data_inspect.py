"""Baselines and inspect statistics on small hand-checkable data and on numpy-commit-tags."""

from pathlib import Path

import pytest

from proper_fed.data import inspect_dataset, load_dataset, majority_predictions, user_majority_predictions
from proper_fed.data.tasks import get_task
from proper_fed.data.types import Dataset, ProfileItem, Query, User
from proper_fed.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
NUMPY = Path(__file__).parents[2] / "shared" / "data" / "numpy-commit-tags" / "questions.json"


def _user(uid, tags, golds):
    task_items = tuple(ProfileItem(f"{uid}-{i}", {"description": "d", "tag": t}) for i, t in enumerate(tags))
    return User(uid, task_items, tuple(Query(f"{uid}-q{j}", "x", g) for j, g in enumerate(golds)))


def test_baselines_and_deterministic_ties():
    task = get_task("LaMP-2")
    ds = Dataset(
        task,
        (
            _user("a", ["comedy", "comedy", "action"], ["comedy"]),
            _user("b", ["action", "romance"], ["romance"]),  # tie: action is more frequent overall
            _user("c", ["action"], ["action"]),
        ),
    )
    assert set(majority_predictions(ds).values()) == {"action"}  # 3 action vs 2 comedy pooled
    assert user_majority_predictions(ds) == {"a-q0": "comedy", "b-q0": "action", "c-q0": "action"}
    stats = inspect_dataset(ds)
    assert stats.baselines["majority"]["label"] == "action"
    assert stats.baselines["majority"]["accuracy"] == pytest.approx(1 / 3)
    assert stats.baselines["user_majority"]["accuracy"] == pytest.approx(2 / 3)
    assert list(stats.profile_labels)[:3] == ["action", "comedy", "romance"]
    assert stats.profile_labels["sci-fi"] == 0  # absent labels are listed
    assert stats.items_per_user["min"] == 1 and stats.items_per_user["max"] == 3
    assert stats.items_per_user["p50"] == 2


def test_generation_tasks_have_no_label_baselines():
    stats = inspect_dataset(load_dataset(FIXTURES / "lamp4"))
    assert stats.baselines == {} and stats.profile_labels == {} and stats.users == 1
    with pytest.raises(DataError, match="no labelled history"):
        majority_predictions(load_dataset(FIXTURES / "lamp1"))


def test_numpy_commit_tags_figures():
    if not NUMPY.is_file():
        pytest.skip(f"numpy-commit-tags not found at {NUMPY}")
    stats = inspect_dataset(load_dataset(NUMPY))
    assert (stats.users, stats.queries) == (85, 425)
    assert stats.baselines["majority"]["label"] == "MAINT"
    assert stats.baselines["majority"]["accuracy"] == pytest.approx(105 / 425)  # 0.247
    # 190/425 with ties broken by global frequency; the README's 43.5% (185) is another tie-break.
    assert stats.baselines["user_majority"]["accuracy"] == pytest.approx(190 / 425)
    assert stats.to_dict()["items_per_user"]["max"] == 200
