"""The Flower processes a deployment or simulation runs (`flwr`, `flower-superlink`, `flower-supernode`):
where their executables are, the environment they get, starting them with their output in a log file,
following that log, pid files, and stopping a whole process tree. Built on psutil; nothing here prints.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from proper_fed.atomic import atomic_write_text
from proper_fed.errors import DeployError

log = logging.getLogger(__name__)

# Environment every Flower process of ours gets: no telemetry, no `uv sync` (it would pull a CUDA torch),
# Ray bound to loopback, nothing fetched from a model hub.
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HF_HUB_OFFLINE": "1",
}
# What a failing Flower process prints about why (exit reports, gRPC/HTTP errors, TLS failures).
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Flower colours its log levels
_REASON_MARKERS = ("ERROR", "Error", "error:", "[code:", "Exit Code", "Failed", "failed", "refused")


def flwr_env(base: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (the caller's environment) with our Flower settings and `extra` on top. This interpreter's
    folder leads PATH: `flwr run` starts `flower-superlink` by name, which must be this environment's even
    when the venv is not activated."""
    path = os.pathsep.join(p for p in (str(Path(sys.executable).parent), base.get("PATH", "")) if p)
    return {**base, **FLWR_ENV, "PATH": path, **(extra or {})}


def executable(name: str) -> str:
    """A console script of this environment: beside the running interpreter (so `.venv/bin/proper-fed` works
    without an activated venv), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise DeployError(
            f"{name} not found beside {sys.executable} nor on PATH; install flwr[simulation]==1.41.0"
        )
    return found


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class LogFollower:
    """New complete lines of a log file since a byte offset (by default: its end when created)."""

    def __init__(self, path: Path, offset: int | None = None) -> None:
        self.path = path
        self.start = offset if offset is not None else (path.stat().st_size if path.exists() else 0)
        self.offset = self.start
        self.seen: list[str] = []

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # keep a half-written line for the next call
        self.offset += end
        lines = chunk[:end].decode(errors="replace").splitlines()
        self.seen.extend(lines)
        return lines

    def before(self) -> str:
        """The log as it was before this follower started (an earlier process's output)."""
        try:
            with open(self.path, "rb") as f:
                return f.read(self.start).decode(errors="replace")
        except FileNotFoundError:
            return ""

    def reason(self, lines: int = 6) -> str:
        """The process's own last error lines (or its last lines, if none look like errors)."""
        text = [_ANSI.sub("", ln).strip() for ln in self.seen if ln.strip()]
        errors = [ln for ln in text if any(m in ln for m in _REASON_MARKERS)]
        return "\n".join((errors or text)[-lines:]) or "(no output)"


def spawn(
    cmd: Sequence[str], log_path: Path, env: Mapping[str, str], detach: bool, pid_path: Path | None = None
) -> psutil.Popen:
    """Start `cmd` with its output appended to `log_path`. `detach`: in its own session, so it outlives this
    process and a Ctrl-C here; otherwise it shares our process group (a signal to the group reaches it)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = psutil.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(env),
            start_new_session=detach,
        )  # fmt: skip
    if pid_path is not None:
        atomic_write_text(pid_path, f"{proc.pid}\n")
    log.info("started pid %d: %s", proc.pid, " ".join(cmd))
    return proc


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def read_pid(path: Path, expect: str) -> psutil.Process | None:
    """The process recorded in `path` if it is alive and `expect` is in its command line (a reused pid is
    never mistaken for ours); else None, and a stale file is removed."""
    try:
        proc = psutil.Process(int(path.read_text().split()[0]))
        ours = alive(proc) and expect in " ".join(proc.cmdline())
    except (OSError, ValueError, IndexError, psutil.Error):
        ours, proc = False, None
    if not ours:
        path.unlink(missing_ok=True)
        return None
    return proc


def stop_tree(proc: psutil.Process, timeout_s: float = 20.0) -> list[int]:
    """Stop `proc` and every process it started (Flower's SuperExec and app processes may live in their own
    sessions): SIGTERM to all, SIGKILL to what still runs after `timeout_s`. Returns the pids stopped."""
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in family:
        _quietly(p.terminate)
    _, left = psutil.wait_procs(family, timeout=timeout_s)
    for p in left:
        _quietly(p.kill)
    psutil.wait_procs(left, timeout=5)
    return [p.pid for p in family]


def stop_recorded(pid_path: Path, expect: str) -> int | None:
    """Stop the process recorded in `pid_path` (if it is ours and alive) with everything it started, and
    remove the record; its pid, or None when nothing ran."""
    proc = read_pid(pid_path, expect)
    if proc is not None:
        stop_tree(proc)
        log.info("stopped %s (pid %d)", expect, proc.pid)
    pid_path.unlink(missing_ok=True)
    return None if proc is None else proc.pid


def _quietly(action: Callable[[], None]) -> None:
    try:
        action()
    except psutil.NoSuchProcess:
        pass


def wait_until(
    check: Callable[[], bool],
    proc: psutil.Process,
    follower: LogFollower,
    timeout_s: float | None,
    on_line: Callable[[str], None] | None = None,
) -> str | None:
    """Poll until `check()` holds (returns None), or the process exits or the time runs out (returns why).
    New log lines go to `on_line` as they come."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        for line in follower.new_lines():
            if on_line is not None:
                on_line(line)
        if check():
            return None
        if not alive(proc):
            follower.new_lines()
            return f"exited with code {_exit_code(proc)}"
        if deadline is not None and time.monotonic() > deadline:
            return f"not ready after {timeout_s:.0f} s"
        time.sleep(0.3)


def _exit_code(proc: psutil.Process) -> int | None:
    try:
        return proc.wait(timeout=1)
    except (psutil.TimeoutExpired, psutil.NoSuchProcess, ChildProcessError):
        return None
