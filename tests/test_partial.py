"""No silent partial tables: a run in which a device failed says so first, names the missing user, and exits
non-zero unless the user accepts a partial table with --allow-partial."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulations.run import name_failed_users


def _results(failed: dict) -> dict:
    answered = 3 - len(failed)
    return {
        "answered": f"{answered} of 3 devices answered",
        "task": "LaMP_2M",
        "task_type": "classification",
        "users": {"server": 4, "devices": 3, "devices_answered": answered},
        "config": {"scoring": ["generate"]},
        "failed": failed,
        "methods": {
            "proper": {"metrics": {"accuracy": 0.5, "f1": 0.4}, "parse_rate": 1.0, "per_user": {}},
        },
    }


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """`simulate` replaced by one that returns the given results (the real run is tested in test_simulate)."""
    import simulations.simulate as sim
    from simulations.simulate import Outcome

    def use(results: dict) -> None:
        outcome = Outcome(tmp_path, results, tmp_path / "report.md", {}, {})
        monkeypatch.setattr(sim, "simulate", lambda *a, **k: outcome)

    return use


def _invoke(*args: str):
    from proper_fed_cli.main import app

    return CliRunner().invoke(app, ["simulate", "--quick", *args])


def test_a_failed_device_makes_simulate_exit_non_zero_and_print_why(fake_run):
    fake_run(_results({"7": "device error 422: the device's data does not fit the task"}))
    res = _invoke()
    assert res.exit_code == 1
    assert "2 of 3 devices answered" in res.output
    assert "node 7" in res.output and "error 422" in res.output
    assert "--allow-partial" in res.output


def test_allow_partial_accepts_the_table_of_the_devices_that_answered(fake_run):
    fake_run(_results({"7": "device error 500: the device failed unexpectedly"}))
    res = _invoke("--allow-partial")
    assert res.exit_code == 0, res.output
    assert "2 of 3 devices answered" in res.output and "node 7" in res.output


def test_every_device_answering_exits_zero_with_the_count_in_the_title(fake_run):
    fake_run(_results({}))
    res = _invoke()
    assert res.exit_code == 0, res.output
    assert "3 of 3 devices answered" in res.output


def test_the_user_of_a_failed_node_is_named_from_the_partition_it_noted(tmp_path: Path):
    (tmp_path / "results.json").write_text(json.dumps(_results({"7": "x", "9": "y"})))
    nodes = tmp_path / "device_outputs" / "_nodes"
    nodes.mkdir(parents=True)
    (nodes / "7.json").write_text(json.dumps({"partition-id": 1}))  # node 9 failed before noting it
    named = name_failed_users(tmp_path, ["alice", "bob", "carol"])
    assert named == {"7": "bob"}
    assert json.loads((tmp_path / "results.json").read_text())["failed_users"] == {"7": "bob"}
