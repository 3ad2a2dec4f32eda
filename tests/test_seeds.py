"""`simulate --seeds`: runs matched by device user across seeds (not by node id), users missing in a seed left
out and reported, paired tests within a scoring protocol, and the config's `seeds` key."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from proper_fed.federation.run_config import parse_seeds, write_run_config
from simulations.run import SimulationPlan, plan
from simulations.seeds import (
    TRAINING_SEED_KEYS,
    SeedsOutcome,
    aggregate,
    check_seeds,
    finished_seed,
    protocol_groups,
    seed_plan,
)
from simulations.seeds_report import write_seeds_report

USERS = ["alice", "bob", "carol"]


def _seed_run(
    root: Path,
    seed: int,
    nodes: dict[str, int],
    scores: dict[str, dict[int, float]],
    task_type="classification",
) -> Path:
    """A run folder as simulate leaves it: results.json keyed by node id, `_nodes/<node>.json` = partition.
    `nodes`: node id -> partition of the nodes that started; `scores`: method -> partition -> the primary
    metric (accuracy, or MAE for a rating task)."""
    out = root / f"seed-{seed}"
    (out / "device_outputs" / "_nodes").mkdir(parents=True)
    for node, pid in nodes.items():
        (out / "device_outputs" / "_nodes" / f"{node}.json").write_text(json.dumps({"partition-id": pid}))
    node_of = {pid: node for node, pid in nodes.items()}
    keys = ("mae", "rmse") if task_type == "rating" else ("accuracy", "f1")
    methods = {
        m: {"per_user": {node_of[p]: dict.fromkeys(keys, v) for p, v in by_pid.items()}}
        for m, by_pid in scores.items()
    }
    answered = len({p for by_pid in scores.values() for p in by_pid})
    results = {
        "task": "LaMP_2M",
        "task_type": task_type,
        "config": {"scoring": ["generate", "rank"]},
        "users": {"devices": len(USERS), "devices_answered": answered},
        "methods": methods,
    }
    (out / "results.json").write_text(json.dumps(results))
    return out


def test_users_are_matched_by_partition_not_by_node_id(tmp_path):
    s0 = _seed_run(tmp_path, 0, {"11": 0, "12": 1, "13": 2}, {"proper": {0: 1.0, 1: 0.5, 2: 0.0}})
    s1 = _seed_run(tmp_path, 1, {"905": 2, "3": 0, "77": 1}, {"proper": {0: 0.5, 1: 0.5, 2: 1.0}})
    summary = aggregate({0: s0, 1: s1}, USERS)
    proper = summary["methods"]["proper"]
    assert proper["per_user"] == {"alice": 0.75, "bob": 0.5, "carol": 0.5}
    assert proper["per_seed"] == {"0": 0.5, "1": pytest.approx(2 / 3)}
    assert proper["mean"] == pytest.approx(1.75 / 3) and proper["users"] == 3
    assert proper["ci"][0] <= proper["mean"] <= proper["ci"][1]
    assert summary["users"]["left_out"] == [] and summary["seeds"] == [0, 1]


def test_a_user_missing_in_one_seed_is_left_out_everywhere_and_reported(tmp_path):
    full = {"proper": {0: 1.0, 1: 0.5, 2: 0.0}, "oppu": {0: 0.5, 1: 0.5, 2: 0.5}}
    s0 = _seed_run(tmp_path, 0, {"1": 0, "2": 1, "3": 2}, full)
    # seed 1: carol's device started (noted its partition) and failed
    partial = {m: {p: v for p, v in s.items() if p != 2} for m, s in full.items()}
    s1 = _seed_run(tmp_path, 1, {"4": 0, "5": 1, "6": 2}, partial)
    summary = aggregate({0: s0, 1: s1}, USERS)
    assert summary["devices"]["1"]["missing_users"] == ["carol"] and summary["devices"]["1"]["answered"] == 2
    assert summary["users"]["left_out"] == ["carol"]
    assert set(summary["methods"]["proper"]["per_user"]) == {"alice", "bob"}
    (test,) = [c for c in summary["comparisons"] if c["against"] == "oppu"]
    assert test["users"] == 2 and (test["wins"], test["ties"]) == (1, 1)
    md = write_seeds_report(tmp_path, summary).read_text()
    assert "WARNING: seed 1: only 2 of 3 devices answered; missing: carol" in md
    assert "left out: carol" in md


def test_proper_is_tested_against_each_method_of_its_own_protocol():
    names = ["proper", "oppu", "majority", "proper@rank", "oppu@rank", "zero_shot@rank"]
    groups = protocol_groups({"config": {"scoring": ["generate", "rank"]}}, names)
    assert groups == {
        "generate": ["proper", "oppu", "majority"],
        "rank": ["majority", "proper@rank", "oppu@rank", "zero_shot@rank"],
    }


def test_a_clear_gain_is_marked_significant_in_seeds_md(tmp_path):
    users = [f"u{i}" for i in range(12)]
    nodes = {str(100 + i): i for i in range(12)}
    scores = {
        "proper@rank": {i: 0.5 + 0.04 * (i % 5) + 0.25 for i in range(12)},
        "oppu@rank": {i: 0.5 + 0.04 * (i % 5) for i in range(12)},
        "majority": {i: 0.5 + 0.04 * (i % 5) for i in range(12)},
    }
    runs = {s: _seed_run(tmp_path, s, nodes, scores) for s in (0, 1)}  # no `proper` under 'generate'
    summary = aggregate(runs, users)
    against = {c["against"]: c for c in summary["comparisons"]}
    assert set(against) == {"oppu@rank", "majority"} and against["oppu@rank"]["significant"]
    assert against["oppu@rank"]["ci"] == [pytest.approx(0.25), pytest.approx(0.25)]
    md = write_seeds_report(tmp_path, summary).read_text()
    assert "| **proper@rank** | **oppu@rank** |" in md and "WARNING" not in md


def test_a_rating_task_compares_mae_and_lower_wins(tmp_path):
    scores = {"proper": {0: 0.5, 1: 1.0, 2: 1.5}, "oppu": {0: 1.0, 1: 1.5, 2: 1.5}}
    runs = {s: _seed_run(tmp_path, s, {"1": 0, "2": 1, "3": 2}, scores, "rating") for s in (0, 1)}
    summary = aggregate(runs, USERS)
    assert summary["metric"] == "mae" and not summary["higher_is_better"]
    assert summary["methods"]["proper"]["mean"] == pytest.approx(1.0)
    (test,) = summary["comparisons"]
    assert test["mean_difference"] == pytest.approx(-1 / 3) and (test["wins"], test["losses"]) == (2, 0)


def test_a_seed_sets_the_training_seeds_and_its_own_folder_and_keeps_the_split(tmp_path):
    config = tmp_path / "seeded.toml"
    quick = (Path(__file__).parents[1] / "simulations" / "configs" / "quick.toml").read_text()
    config.write_text(quick.replace('out = "runs/quick"', f'out = "{tmp_path / "o"}"\nseeds = [0, 1, 2]'))
    p = plan(str(config))
    assert p.seeds == (0, 1, 2) and "seeds" not in p.run_config
    sp = seed_plan(p, 2)
    assert sp.out == p.out / "seed-2" and sp.split is p.split
    assert all(sp.run_config[k] == 2 for k in TRAINING_SEED_KEYS) and sp.settings.proper.user.seed == 2
    assert sp.settings.seed == p.settings.seed  # the split's seed
    assert sp.run_config["device-outputs"] == str(p.out / "seed-2" / "device_outputs")


@pytest.mark.parametrize("value", ["0,1", 3, [0, "x"], [1, 1], [0, True]])
def test_config_seeds_must_be_distinct_integers(value):
    from proper_fed.errors import ConfigError

    with pytest.raises(ConfigError, match="distinct integers"):
        parse_seeds(value)
    assert parse_seeds([]) == () and parse_seeds([2, 0]) == (2, 0)


def test_seeds_given_on_the_command_line_must_be_distinct():
    from proper_fed.errors import ConfigError

    assert check_seeds([2, 0]) == (2, 0)
    with pytest.raises(ConfigError, match="distinct seeds"):
        check_seeds([1, 1])


def test_a_seed_with_missing_devices_makes_simulate_exit_non_zero(monkeypatch, tmp_path):
    import simulations.simulate as sim
    from proper_fed_cli.main import app
    from simulations.simulate import Outcome

    full = {"proper": {0: 1.0, 1: 0.5, 2: 0.0}}
    s0 = _seed_run(tmp_path, 0, {"1": 0, "2": 1, "3": 2}, full)
    s1 = _seed_run(tmp_path, 1, {"4": 0, "5": 1}, {"proper": {0: 1.0, 1: 0.5}})
    summary = aggregate({0: s0, 1: s1}, USERS)
    runs = {s: Outcome(d, {"answered": "x"}, d / "report.md", {}, {}) for s, d in ((0, s0), (1, s1))}
    outcome = SeedsOutcome(tmp_path, runs, summary, write_seeds_report(tmp_path, summary))
    monkeypatch.setattr(sim, "simulate", lambda *a, **k: outcome)
    res = CliRunner().invoke(app, ["simulate", "--quick", "--seeds", "0", "1"])
    assert res.exit_code == 1 and "WARNING: seed 1" in res.output and "--allow-partial" in res.output
    res = CliRunner().invoke(app, ["simulate", "--quick", "--seeds", "0", "1", "--allow-partial"])
    assert res.exit_code == 0, res.output


def test_the_pairs_that_isolate_one_part_are_tested_within_each_protocol(tmp_path):
    scores = {
        "proper": {0: 1.0, 1: 1.0, 2: 1.0},
        "proper_group": {0: 0.9, 1: 0.8, 2: 0.7},
        "population_matched": {0: 0.1, 1: 0.2, 2: 0.3},
        "proper_group@rank": {0: 0.9, 1: 0.8, 2: 0.7},
        "population_matched@rank": {0: 0.1, 1: 0.2, 2: 0.3},
    }
    s0 = _seed_run(tmp_path, 0, {"1": 0, "2": 1, "3": 2}, scores)
    rows = {(c["protocol"], c["method"], c["against"]): c for c in aggregate({0: s0}, USERS)["comparisons"]}
    part = rows[("generate", "proper_group", "population_matched")]
    assert part["wins"] == 3 and part["mean_difference"] == pytest.approx(0.6)
    assert ("rank", "proper_group@rank", "population_matched@rank") in rows  # no proper@rank: only the pair
    assert not any(k[2] == "proper_group_unknown" for k in rows)  # a pair with a method that did not run


def _finished(tmp_path: Path, seed: int = 0, answered: int = 3) -> SimulationPlan:
    """A seed folder as a finished run leaves it: its run_config.toml and results.json."""
    sp = seed_plan(plan("quick", {"out": str(tmp_path)}), seed)
    sp.out.mkdir(parents=True)
    write_run_config(sp.run_config, sp.out / "run_config.toml")
    users = {"devices": 3, "devices_answered": answered}
    (sp.out / "results.json").write_text(json.dumps({"task": "LaMP_2M", "users": users, "methods": {}}))
    return sp


def test_a_seed_finished_with_the_same_run_config_is_reused(tmp_path):
    sp = _finished(tmp_path)
    assert finished_seed(sp)["users"]["devices_answered"] == 3


def test_a_seed_with_another_setting_or_seed_runs_again(tmp_path):
    sp = _finished(tmp_path)
    changed = replace(sp, run_config={**sp.run_config, "user.epochs": 7})
    assert finished_seed(changed) is None
    other_seed = seed_plan(plan("quick", {"out": str(tmp_path)}), 1)
    assert finished_seed(replace(other_seed, out=sp.out)) is None


def test_a_seed_that_lost_devices_or_has_no_readable_results_runs_again(tmp_path):
    lost = _finished(tmp_path / "a", answered=2)
    assert finished_seed(lost) is None
    broken = _finished(tmp_path / "b")
    (broken.out / "results.json").write_text("{ cut off")
    assert finished_seed(broken) is None
    (broken.out / "results.json").unlink()
    assert finished_seed(broken) is None
