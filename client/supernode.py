"""A device's SuperNode: start / stop / status, with its pid and log in the device store.

`start` returns only once the SuperNode is connected: Flower logs `SuperNode ID: <id>` once the SuperLink
activated the node, and the process must still be alive a moment later. If it exits first, `start` raises with
the SuperNode's own last error lines (`CERTIFICATE_VERIFY_FAILED`, `[code: 2004] Failed to activate SuperNode`).
A 2004 right after this device's SuperNode was connected means the SuperLink still counts the old one online
(its heartbeat window, 2 x 30 s in Flower 1.41): then `start` waits and tries again instead of failing, every
`RETRY_EVERY_S` until `HEARTBEAT_WINDOW_S` after the first refusal, and then raises saying so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from proper_fed.errors import DeployError
from proper_fed.federation.processes import (
    LogFollower,
    alive,
    read_pid,
    spawn,
    stop_recorded,
    stop_tree,
    wait_until,
)

log = logging.getLogger(__name__)

PID_FILE, LOG_FILE = "supernode.pid", "supernode.log"
EXECUTABLE = "flower-supernode"
CONNECTED = "SuperNode ID:"  # flwr.supernode.start_client_internal logs it once the node is activated
STILL_ONLINE = "[code: 2004]"  # Failed to activate SuperNode: unregistered, or the old one is still online
# Flower: online_until = last heartbeat + HEARTBEAT_PATIENCE (2) x heartbeat interval (30 s); 15 s of margin.
HEARTBEAT_WINDOW_S = 75.0
RETRY_EVERY_S = 10.0
OnLine = Callable[[str], None]


@dataclass(frozen=True)
class Running:
    """A connected SuperNode and the follower of its log (where `start` stopped reading)."""

    proc: psutil.Popen
    follower: LogFollower


def status(store: Path) -> psutil.Process | None:
    """The SuperNode started for this store if it still runs."""
    return read_pid(store / PID_FILE, EXECUTABLE)


def stop(store: Path) -> int | None:
    """Stop the store's SuperNode and everything it started (its ClientApp processes too); its pid, or None."""
    return stop_recorded(store / PID_FILE, EXECUTABLE)


def start(
    cmd: Sequence[str],
    store: Path,
    env: Mapping[str, str],
    detach: bool,
    connect_timeout_s: float | None = 60.0,
    on_line: OnLine | None = None,
) -> Running:
    """Start the SuperNode and return once it is connected; `detach` puts it in its own session (it
    outlives this process). Raises DeployError with the SuperNode's reason if it does not connect."""
    running = status(store)
    if running is not None:
        raise DeployError(
            f"a SuperNode of {store} already runs (pid {running.pid}); `proper-fed client stop --store {store}`"
        )
    first_failure: float | None = None
    while True:
        follower = LogFollower(store / LOG_FILE)
        proc = spawn(cmd, store / LOG_FILE, env, detach, pid_path=store / PID_FILE)
        why = _await_connection(proc, follower, connect_timeout_s, on_line)
        if why is None:
            return Running(proc, follower)
        (store / PID_FILE).unlink(missing_ok=True)
        retried = first_failure is not None
        first_failure = first_failure if retried else time.monotonic()
        waited_s = time.monotonic() - first_failure
        if not _retry_after_heartbeat(follower, waited_s, on_line):
            raise DeployError(_failure(why, follower, store, waited_s if retried else None))


def _await_connection(
    proc: psutil.Popen, follower: LogFollower, timeout_s: float | None, on_line: OnLine | None
) -> str | None:
    """None once connected (and still alive a moment later), else why not; a process that did not connect
    in time is stopped."""
    why = wait_until(lambda: any(CONNECTED in ln for ln in follower.seen), proc, follower, timeout_s, on_line)
    if why is None:
        time.sleep(1.0)
        if alive(proc):
            return None
        why = "exited right after it connected"
    if alive(proc):
        stop_tree(proc, timeout_s=5)
    return why


def _retry_after_heartbeat(follower: LogFollower, waited_s: float, on_line: OnLine | None) -> bool:
    """A refused activation of a node that was connected before: wait out the SuperLink's heartbeat window."""
    refused = any(STILL_ONLINE in ln for ln in follower.seen)
    if not (refused and CONNECTED in follower.before() and waited_s < HEARTBEAT_WINDOW_S):
        return False
    pause = min(RETRY_EVERY_S, HEARTBEAT_WINDOW_S - waited_s)  # the last try lands on the deadline
    note = (
        f"the SuperLink still counts this device's previous SuperNode as online (heartbeat window); "
        f"retrying in {pause:.0f} s ({waited_s:.0f} of {HEARTBEAT_WINDOW_S:.0f} s waited)"
    )
    log.warning(note)
    if on_line is not None:
        on_line(note)
    time.sleep(pause)
    return True


def _failure(why: str, follower: LogFollower, store: Path, retried_s: float | None = None) -> str:
    """The error of a SuperNode that did not connect: its own reason, and what a refused activation means.
    `retried_s`: how long `start` already retried a refused activation (None: it did not)."""
    reason = follower.reason()
    key = store / "node-auth" / "node_auth_key.pub"
    hint = ""
    if STILL_ONLINE in reason and retried_s is not None:
        hint = (
            f"\nthe SuperLink still refused to activate this node after {retried_s:.0f} s of retries, past its "
            "heartbeat window: another SuperNode with this device's key is still connected (stop it), or the key "
            f"is no longer registered (operator: `proper-fed server register-client {key}`)"
        )
    elif STILL_ONLINE in reason:
        hint = (
            "\nthe SuperLink refused to activate this node: is its public key registered "
            f"(operator: `proper-fed server register-client {key}`)?"
        )
    return f"the SuperNode {why} without connecting:\n{reason}{hint}\n(full log: {store / LOG_FILE})"


def follow(run: Running, store: Path, on_line: OnLine) -> int:
    """Pass the running SuperNode's new log lines to `on_line` until it exits; its exit code. An interrupt
    (Ctrl-C) stops it and everything it started."""
    try:
        wait_until(lambda: False, run.proc, run.follower, None, on_line)
    except KeyboardInterrupt:
        stop_tree(run.proc)
    (store / PID_FILE).unlink(missing_ok=True)
    code = run.proc.wait()
    return 130 if code is None else code
