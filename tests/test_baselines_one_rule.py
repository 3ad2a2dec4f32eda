"""One rule for the label baselines and one for history cohorts, wherever they are computed."""

from __future__ import annotations

from proper_fed.data.baselines import label_ranking, user_majority_label, user_majority_predictions
from proper_fed.data.metrics import cohort_labels, history_cohorts
from proper_fed.data.tasks import get_task
from proper_fed.data.types import Dataset, ProfileItem, Query, User


def _user(uid: str, labels: list[str]) -> User:
    items = tuple(ProfileItem(f"{uid}-p{i}", {"description": "d", "tag": t}) for i, t in enumerate(labels))
    return User(uid, items, (Query(f"{uid}-q", "x", "comedy"),))


def test_the_device_breaks_user_majority_ties_as_data_baselines_does():
    """A user tied between 'sci-fi' and 'action' gets the label more frequent in the pool ('sci-fi'), not
    the alphabetically first one; the device's baseline equals `user_majority_predictions`."""
    from client.device import label_baselines
    from proper_fed.data import device_eval_examples

    task = get_task("LaMP-2")
    tied = _user("tied", ["action", "sci-fi"])
    pool = [_user("s1", ["sci-fi", "sci-fi", "action"]), _user("s2", ["sci-fi"])]
    ranking = label_ranking(task, pool)
    assert ranking[0] == "sci-fi" and user_majority_label(task, tied, ranking) == "sci-fi"
    assert user_majority_predictions(Dataset(task, [tied]), pool=pool) == {"tied-q": "sci-fi"}
    device = label_baselines(task, tied, device_eval_examples(task, tied), ranking)
    assert device["user_majority"].raw == ["sci-fi"] and device["majority"].raw == ["sci-fi"]
    assert user_majority_label(task, _user("new", []), ranking) == "sci-fi"  # no history: the majority


def test_cohorts_keep_equal_histories_together_for_nodes_and_users():
    by_node = cohort_labels({11: 5, 12: 5, 13: 14})
    assert by_node == {11: "Q1 (5 items)", 12: "Q1 (5 items)", 13: "Q4 (14 items)"}
    users = [_user(f"u{i}", ["comedy"] * n) for i, n in enumerate([5, 5, 14])]
    assert {k: [u.user_id for u in v] for k, v in history_cohorts(users).items()} == {
        "Q1 (5 items)": ["u0", "u1"],
        "Q4 (14 items)": ["u2"],
    }


def test_results_json_cohorts_use_the_same_rule():
    from server.results import DeviceReply, aggregate

    task = get_task("LaMP-2")
    replies = {}
    for node, n in ((11, 5), (12, 5), (13, 14)):
        replies[node] = DeviceReply(node, metrics={"history_len": n, "proper.n": 1, "proper.parsed": 1})

    class Split:
        pass

    split = Split()
    split.task = task
    cohorts = aggregate(split, replies)["methods"]["proper"]["cohorts"]
    assert sorted(cohorts) == ["Q1 (5 items)", "Q4 (14 items)"]
