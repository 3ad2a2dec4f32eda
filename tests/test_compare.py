"""`proper-fed compare A B`: two multi-seed runs paired by device user, method by method; runs that cannot be
paired are refused with what to do."""

import json

import pytest
from typer.testing import CliRunner

from proper_fed.errors import ConfigError
from simulations.compare import compare_runs

USERS = [f"u{i}" for i in range(8)]


def _run(folder, per_user: dict[str, dict[str, float]], task="LaMP_2M"):
    folder.mkdir(parents=True)
    summary = {
        "task": task,
        "metric": "accuracy",
        "higher_is_better": True,
        "seeds": [0, 1],
        "statistics": {"test": "Wilcoxon"},
        "methods": {m: {"per_user": users} for m, users in per_user.items()},
    }
    (folder / "seeds.json").write_text(json.dumps(summary))
    return folder


def test_methods_are_paired_by_device_user_and_a_minus_b_is_reported(tmp_path):
    a = _run(tmp_path / "a", {"proper": {u: 0.8 for u in USERS}, "oppu": {u: 0.5 for u in USERS}})
    # B lists its users in another order and has one more method and one more user: neither is compared
    b_users = {u: 0.3 + 0.01 * i for i, u in enumerate(reversed(USERS))}
    b = _run(tmp_path / "b", {"proper": {**b_users, "extra": 1.0}, "oppu": dict(b_users), "zero_shot": {}})
    s = compare_runs(a, b)
    rows = {r["method"]: r for r in s["comparisons"]}
    assert list(rows) == ["proper", "oppu"]
    p = rows["proper"]
    assert p["users"] == 8 and p["wins"] == 8 and p["losses"] == 0 and p["significant"]
    assert p["mean_a"] == pytest.approx(0.8) and p["mean_b"] == pytest.approx(0.335)
    assert p["mean_difference"] == pytest.approx(0.8 - 0.335)
    assert rows["oppu"]["mean_difference"] == pytest.approx(0.5 - 0.335)
    assert s["users"] == {"a": 8, "b": 9, "both": 8}


def test_a_folder_without_seeds_json_says_how_to_make_one(tmp_path):
    a = _run(tmp_path / "a", {"proper": {"u0": 1.0}})
    (tmp_path / "single").mkdir()
    with pytest.raises(ConfigError, match="--seeds"):
        compare_runs(a, tmp_path / "single")


def test_runs_on_different_tasks_or_users_are_refused(tmp_path):
    a = _run(tmp_path / "a", {"proper": {"u0": 1.0}})
    with pytest.raises(ConfigError, match="differ in task"):
        compare_runs(a, _run(tmp_path / "b", {"proper": {"u0": 1.0}}, task="LaMP_3"))
    with pytest.raises(ConfigError, match="share no device user"):
        compare_runs(a, _run(tmp_path / "c", {"proper": {"someone": 1.0}}))


def test_the_command_prints_the_table_and_writes_markdown_and_json(tmp_path):
    from proper_fed_cli.main import app

    a = _run(tmp_path / "fed", {"proper": {u: 0.2 for u in USERS}})
    b = _run(tmp_path / "central", {"proper": {u: 0.6 for u in USERS}})
    result = CliRunner().invoke(app, ["compare", str(a), str(b)])
    assert result.exit_code == 0, result.output
    md = (a / "compared-with-central.md").read_text()
    assert "| **proper** | **0.200** | **0.600** | **8** | **-0.400**" in md
    assert json.loads((a / "compared-with-central.json").read_text())["comparisons"][0]["losses"] == 8


def test_a_method_with_no_user_in_both_runs_is_left_out_not_divided_by_zero(tmp_path):
    a = _run(tmp_path / "a", {"proper": {u: 0.8 for u in USERS}, "oppu": {"u0": 0.5}})
    b = _run(tmp_path / "b", {"proper": {u: 0.3 for u in USERS}, "oppu": {"u1": 0.5}})
    assert [r["method"] for r in compare_runs(a, b)["comparisons"]] == ["proper"]
