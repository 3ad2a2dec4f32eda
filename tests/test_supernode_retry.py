"""`client.supernode.start` after a crash: the SuperLink refuses to activate the restarted node
(`[code: 2004] Failed to activate SuperNode`) while it still counts the old one online (its heartbeat window),
so `start` waits and tries again, up to a deadline, then fails saying so. A refusal of a node that was never
connected (an unregistered key) fails at once.

The SuperNode is a stand-in shell script that prints what Flower prints, so no SuperLink is needed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from client import supernode
from proper_fed.errors import DeployError

REFUSED = "ERROR :     Exit Code: 2004\n[code: 2004] Failed to activate SuperNode."
CONNECTED = "INFO :      SuperNode ID: 4242"
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


@pytest.fixture(autouse=True)
def _short_window(monkeypatch):
    monkeypatch.setattr(supernode, "RETRY_EVERY_S", 0.1)
    monkeypatch.setattr(supernode, "HEARTBEAT_WINDOW_S", 30.0)


def _fake_supernode(tmp_path: Path, refusals: int) -> list[str]:
    """A command that is refused `refusals` times (one per start), then connects and stays up."""
    count = tmp_path / "starts"
    script = f"""
n=$(($(cat {count} 2>/dev/null || echo 0) + 1)); echo $n > {count}
if [ $n -le {refusals} ]; then printf '%s\\n' "{REFUSED}"; exit 1; fi
echo "{CONNECTED}"; exec sleep 60
"""
    return ["sh", "-c", script]


def _starts(tmp_path: Path) -> int:
    return int((tmp_path / "starts").read_text())


def _crashed_before(store: Path) -> None:
    """The log of this device's previous SuperNode: it was connected, then died."""
    store.mkdir(parents=True, exist_ok=True)
    (store / supernode.LOG_FILE).write_text(f"{CONNECTED}\nKilled\n")


def test_a_restart_inside_the_heartbeat_window_waits_and_retries(tmp_path):
    store = tmp_path / "store"
    _crashed_before(store)
    notes: list[str] = []
    run = supernode.start(
        _fake_supernode(tmp_path, refusals=2), store, ENV, detach=True, on_line=notes.append
    )
    try:
        assert supernode.alive(run.proc)
        assert _starts(tmp_path) == 3
        assert sum("retrying in" in n and "heartbeat window" in n for n in notes) == 2
        assert (store / supernode.PID_FILE).read_text().split()[0] == str(run.proc.pid)
    finally:
        supernode.stop_tree(run.proc, timeout_s=5)


def test_the_retry_stops_at_the_heartbeat_deadline_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(supernode, "HEARTBEAT_WINDOW_S", 1.0)
    store = tmp_path / "store"
    _crashed_before(store)
    t0 = time.monotonic()
    with pytest.raises(DeployError) as err:
        supernode.start(_fake_supernode(tmp_path, refusals=1000), store, ENV, detach=True)
    assert time.monotonic() - t0 < 15  # the window (1 s) plus the last try, not forever
    assert _starts(tmp_path) >= 2
    text = str(err.value)
    assert "Failed to activate SuperNode" in text  # the SuperNode's own reason
    assert "still refused to activate this node after" in text and "heartbeat window" in text
    assert "register-client" in text and str(store / supernode.LOG_FILE) in text
    assert not (store / supernode.PID_FILE).exists()


def test_a_refused_node_that_never_connected_fails_at_once(tmp_path):
    store = tmp_path / "store"  # a fresh device: nothing in its log was ever connected
    with pytest.raises(DeployError, match="is its public key registered") as err:
        supernode.start(_fake_supernode(tmp_path, refusals=1000), store, ENV, detach=True)
    assert _starts(tmp_path) == 1
    assert "retries" not in str(err.value)
