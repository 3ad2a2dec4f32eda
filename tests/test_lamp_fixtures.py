"""LaMP fixtures in the official layouts (tests/fixtures/lamp/, written by its build.py): each loads as its task,
and `simulate --quick` runs on one layout per task through the real Flower runtime with every device answering.
"""

import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from proper_fed.data import load_dataset, subset_dataset
from proper_fed.data.task_spec import METRICS_BY_TYPE
from proper_fed.data.tasks import lamp_task_id

LAMP = Path(__file__).parent / "fixtures" / "lamp"

# fixture -> (registry task name, outputs' "task" field as the official files spell it, OPPU folder?)
FIXTURES = {
    "user/LaMP_1/dev": ("LaMP-1", "LaMP_1"),
    "user/LaMP_2M/dev": ("LaMP-2", "LaMP_2"),
    "user/LaMP_2N/dev": ("LaMP-2N", "LaMP_2"),  # the old release named news LaMP_2 too
    "user/LaMP_3/dev": ("LaMP-3", "LaMP_3"),
    "user/LaMP_4/dev": ("LaMP-4", "LaMP_4"),
    "user/LaMP_5/dev": ("LaMP-5", "LaMP_5"),
    "user/LaMP_7/dev": ("LaMP-7", "LaMP_7"),
    "time/LaMP_1/dev": ("LaMP-1", "LaMP_1"),
    "time/LaMP_2M/dev": ("LaMP-2", "LaMP_2"),
    "time/LaMP_2N/dev": ("LaMP-2N", "LaMP_2N"),
    "time/LaMP_3/dev": ("LaMP-3", "LaMP_3"),
    "time/LaMP_4/dev": ("LaMP-4", "LaMP_4"),
    "time/LaMP_5/dev": ("LaMP-5", "LaMP_5"),
    "time/LaMP_7/dev": ("LaMP-7", "LaMP_7"),
    "oppu/movie_tagging": ("LaMP-2", None),
    "oppu/news_headline": ("LaMP-4", "LaMP_4"),
}
# One end-to-end run per task, spread over the three layouts; the rest is covered by the loader tests.
# time/LaMP_2M is the reproduction (official wording, 15 tags, 12 users).
END_TO_END = {
    "LaMP-1": "user/LaMP_1/dev/dev_questions.json",
    "LaMP-2": "time/LaMP_2M/dev/dev_questions.json",
    "LaMP-2N": "user/LaMP_2N/dev/dev_questions.json",
    "LaMP-3": "time/LaMP_3/dev/dev_questions.json",
    "LaMP-4": "oppu/news_headline",
    "LaMP-5": "user/LaMP_5/dev/dev_questions.json",
    "LaMP-7": "time/LaMP_7/dev/dev_questions.json",
}
MULTI_WORD = {
    "LaMP-2": {"dark comedy", "based on a book", "true story"},
    "LaMP-2N": {"style & beauty", "food & drink"},
}


def _read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("rel", sorted(FIXTURES))
def test_fixture_loads_as_its_task_with_every_user_and_gold(rel):
    task_name, _ = FIXTURES[rel]
    ds = load_dataset(LAMP / rel)
    assert ds.task.name == task_name
    assert len(ds.users) == 12
    queries = [q for u in ds.users for q in u.queries]
    assert queries and all(q.gold for q in queries)
    assert all(3 <= len(u.profile) <= 6 for u in ds.users)
    if ds.task.type != "generation":
        labels = set(ds.task.labels) if ds.task.type == "classification" else {"1", "2", "3", "4", "5"}
        assert {q.gold for q in queries} <= labels
        if ds.task.profile_labelled:  # LaMP-1's papers carry no citation label
            assert {it.fields[ds.task.output_field] for u in ds.users for it in u.profile} <= labels
    if task_name in MULTI_WORD:  # the labels the privacy guard used to reject
        golds = {q.gold for q in queries} | {
            it.fields[ds.task.output_field] for u in ds.users for it in u.profile
        }
        assert MULTI_WORD[task_name] <= golds


@pytest.mark.parametrize("rel", sorted(r for r in FIXTURES if not r.startswith("oppu")))
def test_lamp_files_have_exactly_the_official_keys(rel):
    task_name, outputs_task = FIXTURES[rel]
    questions = _read(LAMP / rel / "dev_questions.json")
    outputs = _read(LAMP / rel / "dev_outputs.json")
    question_keys = {"id", "input", "profile"} | ({"user_id"} if rel.startswith("time") else set())
    assert all(set(q) == question_keys for q in questions)
    assert set(outputs) == {"task", "golds"} and outputs["task"] == outputs_task
    assert [g["id"] for g in outputs["golds"]] == [q["id"] for q in questions]
    assert all(set(g) == {"id", "output"} and isinstance(g["output"], str) for g in outputs["golds"])
    spec = load_dataset(LAMP / rel).task
    for q in questions:
        assert q["input"].startswith(spec.detect_prefix)
        if spec.type == "classification" and task_name != "LaMP-1":  # lists the official label set, in order
            assert f"[{', '.join(spec.labels)}]" in q["input"]
        for item in q["profile"]:
            assert isinstance(item["id"], str) and ("date" in item) == rel.startswith("time")


def test_user_based_questions_are_users_and_time_based_group_by_user_id():
    user_based = load_dataset(LAMP / "user/LaMP_2M/dev")
    assert [u.user_id for u in user_based.users] == [u.queries[0].id for u in user_based.users]
    time_based = load_dataset(LAMP / "time/LaMP_2M/dev")
    questions = _read(LAMP / "time/LaMP_2M/dev/dev_questions.json")
    assert [u.user_id for u in time_based.users] == [q["user_id"] for q in questions]


def test_oppu_folders_keep_their_server_split_and_read_golds_inline_or_from_the_label_file():
    for name, others in (("movie_tagging", 9), ("news_headline", 9)):
        ds = load_dataset(LAMP / "oppu" / name)
        assert len(ds.server_user_ids) == others
        top = _read(LAMP / "oppu" / name / "user_top_100_history.json")
        assert all(set(u) == {"user_id", "profile", "query"} for u in top)
        assert any(len(u["query"]) == 2 for u in top)
    labels = _read(LAMP / "oppu/news_headline/user_top_100_history_label.json")
    assert labels["task"] == "LaMP_4"
    golds = {q.id: q.gold for u in load_dataset(LAMP / "oppu/news_headline").users for q in u.queries}
    assert all(golds[g["id"]] == g["output"] for g in labels["golds"])


def test_max_profile_orders_dates_as_lamp_does_years_and_unpadded_dates_included():
    # LaMP's recency retriever sorts by tuple(map(int, date.split("-"))); as text "2013-4-9" > "2013-10-1"
    user = load_dataset(LAMP / "time/LaMP_4/dev").users[0]
    dates = ["2013-10-1", "2013-4-9", "2012-12-30"]
    profile = tuple(
        replace(it, fields={**it.fields, "date": d}) for it, d in zip(user.profile[:3], dates, strict=True)
    )
    ds = replace(load_dataset(LAMP / "time/LaMP_4/dev"), users=(replace(user, profile=profile),))
    kept = subset_dataset(ds, max_profile=2).users[0].profile
    assert [it.fields["date"] for it in kept] == ["2013-4-9", "2013-10-1"]
    years = load_dataset(LAMP / "time/LaMP_1/dev")  # LaMP-1 dates are publication years
    assert all(it.fields["date"].isdigit() for u in years.users for it in u.profile)
    kept = subset_dataset(years, max_profile=2).users[0].profile
    assert [it.fields["date"] for it in kept] == sorted(it.fields["date"] for it in years.users[0].profile)[
        -2:
    ]


def test_build_script_reproduces_the_committed_fixtures(tmp_path):
    spec = importlib.util.spec_from_file_location("lamp_build", LAMP / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.ROOT = tmp_path
    build.main()
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.json"))
    committed = sorted(p.relative_to(LAMP) for p in LAMP.rglob("*.json"))
    assert written == committed
    for rel in written:
        assert (tmp_path / rel).read_text() == (LAMP / rel).read_text(), rel


# --- end to end -------------------------------------------------------------------------------------------


def _lamp_scorer():
    path = Path(__file__).with_name("lamp_scorer.py")
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("lamp_scorer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("task_name", sorted(END_TO_END))
def test_simulate_quick_runs_on_the_fixture_with_every_device_answering(task_name, tmp_path):
    data = LAMP / END_TO_END[task_name]
    out = tmp_path / "run"
    exe = Path(sys.executable).with_name("proper-fed")
    proc = subprocess.run(
        [str(exe), "simulate", "--quick", "--no-plots", "--data", str(data), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = _read(out / "results.json")
    assert res["task"] == task_name
    assert res["users"]["devices"] == 3 and res["users"]["devices_answered"] == 3, res["users"]
    assert not res["failed"], res["failed"]
    expected = set(METRICS_BY_TYPE[res["task_type"]])
    assert {"zero_shot", "population", "oppu", "proper"} <= set(res["methods"])
    for name, method in res["methods"].items():
        assert set(method["metrics"]) == expected, name
        assert all(math.isfinite(v) for v in method["metrics"].values()), name

    ds = load_dataset(data)
    golds = {q.id: q.gold for u in ds.users for q in u.queries}
    # OPPU keeps its own split (README: user_others become server users, as in OPPU): the devices are the
    # user_top_100_history users; LaMP users have one question each
    device_queries = {q.id for u in ds.users if u.user_id not in ds.server_user_ids for q in u.queries}
    scorer = _lamp_scorer()
    spec = ds.task
    for name, method in res["methods"].items():
        preds = _read(out / "predictions" / f"{name}.json")
        assert preds["task"] == lamp_task_id(task_name)  # the id LaMP's eval_task.py checks ("LaMP_2")
        rows = {row["id"]: row["output"] for row in preds["golds"]}
        assert set(rows) <= set(golds), name
        if ds.server_user_ids:
            assert set(rows) == device_queries, f"{name}: devices are not OPPU's user_top_100_history users"
        else:
            assert len(rows) == res["users"]["devices_answered"], name
        if scorer is None:
            continue
        ours = scorer.score(
            res["task_type"],
            {qid: golds[qid] for qid in rows},
            rows,
            labels=list(spec.labels) if spec.labels else None,
            scale=tuple(spec.scale) if spec.scale else None,
        )
        shared = set(ours) & set(method["metrics"])
        assert shared, (name, ours, method["metrics"])
        for key in shared:
            assert ours[key] == pytest.approx(method["metrics"][key], abs=1e-6), (name, key)
