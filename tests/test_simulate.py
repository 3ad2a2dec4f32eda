"""`proper-fed simulate --quick`: the whole pipeline through Flower's simulation runtime, end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    exe = Path(sys.executable).with_name("proper-fed")
    # Not activated: the venv's bin folder is not on PATH; Flower's executables are found beside proper-fed.
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != str(exe.parent))
    proc = subprocess.run(
        [str(exe), "simulate", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_every_method_is_scored_on_the_same_device_users(quick_run):
    out, stdout = quick_run
    res = json.loads((out / "results.json").read_text())
    expected = {
        "majority",
        "user_majority",
        "zero_shot",
        "population",
        "proper_group",
        "oppu",
        "proper",
        "proper_no_lora_router",
        "proper_no_constraint",
    }
    assert expected <= set(res["methods"])
    assert res["users"]["devices_answered"] == res["users"]["devices"] > 0 and not res["failed"]
    users = {frozenset(m["per_user"]) for m in res["methods"].values()}
    assert len(users) == 1, "methods were scored on different users"
    for name, m in res["methods"].items():
        assert set(m["metrics"]) == {"accuracy", "f1"}, name
        assert 0.0 <= m["metrics"]["accuracy"] <= 1.0
    assert res["methods"]["proper"]["trainable_parameters_per_user"] > 0
    assert res["methods"]["zero_shot"]["trainable_parameters_per_user"] == 0
    assert "proper" in stdout and "accuracy" in stdout  # the table is printed at the end


def test_bytes_are_accounted_per_device_and_only_metrics_come_back(quick_run):
    out, _ = quick_run
    res = json.loads((out / "results.json").read_text())
    for node, phases in res["bytes"]["per_device"].items():
        assert phases["train_user"]["sent"] > 10_000, node  # the signed bundle went out
        # what came back: "done", then the SecAgg+ round (keys, shares, one masked vector), not arrays
        assert phases["train_user"]["received"] == 0, node
        assert 0 < phases["secure_sum"]["received"] < 50_000, node


def test_predictions_are_written_in_lamp_outputs_layout(quick_run):
    out, _ = quick_run
    res = json.loads((out / "results.json").read_text())
    n_queries = sum(1 for _ in res["history_len"])  # one entry per answering device
    proper = json.loads((out / "predictions" / "proper.json").read_text())
    assert proper["task"] == res["task"] and len(proper["golds"]) >= n_queries
    assert all(set(row) == {"id", "output"} for row in proper["golds"])


def test_report_and_plots_are_written(quick_run):
    out, _ = quick_run
    report = (out / "report.md").read_text()
    assert "| `proper` |" in report and "stage 1 -> 2" in report and "bytes per device" in report
    for png in ("cohorts.png", "routing_density.png", "user_embeddings.png"):
        assert (out / png).stat().st_size > 1000, png


def test_the_server_learned_exact_secure_sums_and_the_tables_come_from_the_devices_files(quick_run):
    """Flower's real SecAgg+ in the simulation runtime: the sums the server decoded equal the sums of the
    statistics each virtual device kept on the simulation's disk, counts exactly, score sums and seconds
    within the fixed-point resolution; the per-user tables are those files', labelled as such."""
    from proper_fed.federation.run_settings import device_stats_path

    out, _ = quick_run
    res = json.loads((out / "results.json").read_text())
    secure = res["secure_aggregation"]
    assert secure["released"] and secure["devices_summed"] == res["users"]["devices_answered"] >= 3
    assert "simulation only" in secure["tables"] and secure["dp"] is None
    local = [json.loads(device_stats_path(out / "device_outputs", n).read_text()) for n in secure["nodes"]]
    assert secure["sums"]["devices"] == len(local)
    for key, got in secure["sums"].items():
        want = sum(d.get(key, 0.0) for d in local) if key != "devices" else len(local)
        if key.endswith(("_s", "rouge1", "rougeL", "abs_err", "sq_err")):
            assert abs(got - want) <= len(local) * 1e-3, key
        else:
            assert got == want, key  # counts: exact
    assert set(res["history_len"]) == set(secure["nodes"])
    assert {n: d["history_len"] for n, d in zip(secure["nodes"], local, strict=True)} == res["history_len"]
