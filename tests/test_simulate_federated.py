"""`proper-fed simulate --config federated-quick`: stages 1-2 trained by the devices through SecAgg+ rounds in
Flower's simulation runtime, then stage 3 and the report, end to end on the tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _no_nan(token: str) -> float:
    raise AssertionError(f"results.json holds {token}: not JSON")


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("federated")
    exe = Path(sys.executable).with_name("proper-fed")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}  # as test_simulate's quick_run
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != str(exe.parent))
    proc = subprocess.run(
        [str(exe), "simulate", "--config", "federated-quick", "--no-plots", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text(), parse_constant=_no_nan)


def test_stages_1_and_2_are_trained_by_every_device_in_secagg_rounds(federated_run):
    _, res = federated_run
    assert res["server_data"] == "federated"
    server = res["server"]["proper"]
    devices = res["users"]["devices"]
    for stage in ("population", "group"):
        assert server[f"{stage}.rounds"] == 1 and server[f"{stage}.devices_last_round"] == devices
        assert (
            server[f"{stage}.bytes_from_device_per_round"] > server[f"{stage}.bytes_to_device_per_round"] > 0
        )
    for node, phases in res["bytes"]["per_device"].items():
        assert phases["federated_stages"]["received"] > 0, node


def test_every_device_is_personalized_and_scored_on_the_federated_stages(federated_run):
    _, res = federated_run
    assert res["users"]["devices_answered"] == res["users"]["devices"] > 0 and not res["failed"]
    assert {"population", "proper_group", "oppu", "proper"} <= set(res["methods"])
    assert res["costs"]["proper"]["server_training_tokens"] is None  # trained on the devices: not counted


def test_the_report_says_who_trained_stages_1_2_and_the_bytes_per_round(federated_run):
    out, _ = federated_run
    report = (out / "report.md").read_text()
    assert "stages 1-2 federated" in report
    assert "per device and round of federated population (1 round)" in report
    assert "per device and round of federated group (1 round)" in report
