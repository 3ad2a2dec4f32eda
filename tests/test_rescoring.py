"""LaMP's own rules (tests/lamp_scorer.py) re-score our prediction files to exactly our results: the files hold
what was scored, for exactly the devices results.json counts, under every protocol."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from lamp_scorer import score

from proper_fed.data.metric_stats import metrics_from_stats, query_stats
from proper_fed.data.scoring import scored_answer
from proper_fed.data.task_spec import TaskSpec
from proper_fed.federation.run_settings import RunSettings, load_split
from simulations.run import merge_predictions

QUICK = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "quick.toml"


def _rescore_parsed(task: TaskSpec, raws: list[str], golds: list[str]) -> tuple[dict, dict]:
    ids = [f"q{i}" for i in range(len(golds))]
    ours = metrics_from_stats(task, query_stats(task, raws, golds))
    theirs = score(
        task.type,
        dict(zip(ids, golds, strict=True)),
        {i: scored_answer(task, r) for i, r in zip(ids, raws, strict=True)},
        labels=list(task.labels),
        scale=task.scale,
    )
    return ours, theirs


@pytest.mark.parametrize(
    ("task", "raws", "golds"),
    [
        (
            TaskSpec(
                "t", "classification", "x", "y", labels=("comedy", "dark comedy", "[1]", "style & beauty")
            ),
            ["Dark Comedy!", "it is [1]", "nothing", "", "style & beauty", "comedy, dark comedy"],
            ["dark comedy", "[1]", "comedy", "comedy", "style & beauty", "dark comedy"],
        ),
        (
            TaskSpec("r", "rating", "x", "y", scale=(1, 5)),
            ["4", "I'd give it 5 stars", "4.5", "none", "10", " 2 ", "3"],
            ["4", "3", "2", "1", "5", "3", "3"],
        ),
        (
            TaskSpec("g", "generation", "x", "y"),
            ["  A Study of Things ", "", "the the cat", "Über-fast ROUGE"],
            ["a study of things", "some title", "the cat sat", "uber fast rouge"],
        ),
    ],
    ids=["classification", "rating", "generation"],
)
def test_scored_answers_rescore_to_our_statistics(task, raws, golds):
    ours, theirs = _rescore_parsed(task, raws, golds)
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k] == pytest.approx(theirs[k], abs=1e-9), k


def _device_rows(out: Path, node: str, ids: list[str]) -> None:
    folder = out / "device_outputs" / "proper"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "output": "like", "raw": "I like it"} for i in ids]
    (folder / f"{node}.json").write_text(json.dumps(rows))


def test_merge_keeps_only_the_devices_results_count(tmp_path):
    results = {"methods": {"proper": {"per_user": {"11": {"accuracy": 1.0}}}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    _device_rows(tmp_path, "11", ["b", "a"])
    _device_rows(tmp_path, "22", ["c"])  # a device the server gave up on
    written = merge_predictions(tmp_path, "LaMP_2")
    pred = json.loads(written["proper"].read_text())
    raw = json.loads((tmp_path / "raw" / "proper.json").read_text())
    assert pred == {"task": "LaMP_2", "golds": [{"id": "a", "output": "like"}, {"id": "b", "output": "like"}]}
    assert [r["output"] for r in raw["golds"]] == ["I like it", "I like it"]


@pytest.fixture(scope="module")
def two_protocol_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rescore")
    config = QUICK.read_text().replace("[run]\n", '[run]\nscoring = "generate,rank"\n', 1)
    (tmp / "quick_rank.toml").write_text(config)
    out = tmp / "out"
    exe = Path(sys.executable).with_name("proper-fed")
    cmd = [str(exe), "simulate", "--quick", "--config", str(tmp / "quick_rank.toml"), "--out", str(out)]
    proc = subprocess.run([*cmd, "--no-plots"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_prediction_files_rescore_to_results_under_both_protocols(two_protocol_run):
    out = two_protocol_run
    res = json.loads((out / "results.json").read_text())
    flat = tomllib.loads((out / "run_config.toml").read_text())
    split = load_split(RunSettings.from_run_config(flat))
    task = split.task
    golds = {q.id: q.gold for u in split.device_users for q in u.queries if q.gold is not None}
    assert res["users"]["devices_answered"] == res["users"]["devices"] == len(split.device_users)
    methods = set(res["methods"])
    expected = {"majority", "user_majority"}
    for m in (*flat["methods"].split(","), *flat["variants"].split(",")):  # every method the run asked for
        expected |= {m, f"{m}@rank"}
    assert methods == expected
    assert {p.stem for p in (out / "predictions").glob("*.json")} == methods
    for name in sorted(methods):
        pred = json.loads((out / "predictions" / f"{name}.json").read_text())
        raw = json.loads((out / "raw" / f"{name}.json").read_text())
        assert pred["task"] == res["task"]
        preds = {r["id"]: r["output"] for r in pred["golds"]}
        assert len(preds) == len(pred["golds"]) and set(preds) == set(golds), name  # answered devices only
        assert [r["id"] for r in raw["golds"]] == [r["id"] for r in pred["golds"]], name
        if name.endswith("@rank"):
            assert set(preds.values()) <= set(task.labels), name
        rescored = score(task.type, golds, preds, labels=list(task.labels), scale=task.scale)
        for metric, value in res["methods"][name]["metrics"].items():
            assert rescored[metric] == pytest.approx(value, abs=1e-9), (name, metric)
