"""`proper-fed simulate --quick --seeds 0 1`: two whole runs through Flower's simulation runtime, one folder
each, and the comparison over seeds with intervals and paired tests."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds")
    exe = Path(sys.executable).with_name("proper-fed")
    # As test_simulate's quick_run: not activated, Flower's executables are found beside proper-fed.
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != str(exe.parent))
    proc = _simulate(exe, out, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, exe, env


def _simulate(exe: Path, out: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(exe), "simulate", "--quick", "--no-plots", "--out", str(out), "--seeds", "0", "1", *extra],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )


def test_each_seed_is_a_complete_run_with_its_training_seeds(seeded_run):
    out, *_ = seeded_run
    for seed in (0, 1):
        run = out / f"seed-{seed}"
        assert (run / "results.json").is_file() and (run / "report.md").is_file()
        assert (run / "predictions" / "proper.json").is_file()
        config = tomllib.loads((run / "run_config.toml").read_text())
        assert config["population.seed"] == config["group.seed"] == config["user.seed"] == seed
    assert not (out / "results.json").exists()  # no run of its own in the parent folder


def test_seeds_json_has_both_seeds_intervals_and_paired_tests(seeded_run):
    out, stdout, *_ = seeded_run
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["metric"] == "accuracy"
    assert summary["users"]["left_out"] == [] and summary["users"]["in_every_seed"] > 1
    for name, m in summary["methods"].items():
        assert set(m["per_seed"]) == {"0", "1"}, name
        assert m["users"] == summary["users"]["device_users"], name
        assert m["ci"][0] <= m["mean"] <= m["ci"][1], name
    against = {c["against"] for c in summary["comparisons"] if c["method"] == "proper"}
    assert {"oppu", "population", "majority"} <= against
    assert "Paired per-user tests" in (out / "seeds.md").read_text()
    assert "proper against each method" in stdout


def test_running_it_again_reuses_the_finished_seeds_and_rewrites_the_comparison(seeded_run):
    out, _, exe, env = seeded_run
    before = {s: (out / f"seed-{s}" / "results.json").stat().st_mtime_ns for s in (0, 1)}
    (out / "seeds.json").unlink()
    proc = _simulate(exe, out, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("reusing") == 2
    assert {s: (out / f"seed-{s}" / "results.json").stat().st_mtime_ns for s in (0, 1)} == before
    assert json.loads((out / "seeds.json").read_text())["seeds"] == [0, 1]
