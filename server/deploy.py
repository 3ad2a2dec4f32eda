"""Flower's own deployment engine, driven for proper-fed: the SuperLink process, the `flwr` CLI connection
that reaches it, run submission, SuperNode registration, pid files. The CLI (`proper-fed server ...`) parses
options and calls these; nothing here prints or exits.

Flower 1.41 facts this relies on: one HTTPS port per SuperLink (Fleet, Control and Runtime APIs);
`flwr run APP CONNECTION` and `flwr supernode register KEY.pub CONNECTION` read CONNECTION from
`$FLWR_HOME/config.toml` (`[superlink.<name>]` with `address`, `root-certificates`, `insecure`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proper_fed.atomic import atomic_write_text
from proper_fed.certs import CA_CERT_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE
from proper_fed.errors import ConfigError, ProperFedError
from proper_fed.run_settings import BUILTIN_DATA, RunSettings, flatten_config

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[1]  # the repository root is the Flower app (pyproject [tool.flwr])
DEFAULT_CONNECTION = "proper-fed"
DEFAULT_PORT = 9093
# Run config keys that name files: made absolute, since the ServerApp runs in the SuperLink's working dir.
PATH_KEYS = ("out", "state-dir", "server-key", "server-public-key", "data", "device-outputs")

# Environment every Flower process of ours gets: no telemetry, no `uv sync` (it would pull a CUDA torch),
# Ray bound to loopback, nothing fetched from a model hub.
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HF_HUB_OFFLINE": "1",
}


class DeployError(ProperFedError):
    """A Flower process could not be started, reached, or stopped; the message says what to check."""


def flwr_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **FLWR_ENV, **(extra or {})}


def executable(name: str) -> str:
    """A console script of this environment (beside the running python), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found; install flwr[simulation]==1.41.0 in this environment")
    return found


# ---- the SuperLink ----


@dataclass(frozen=True)
class TlsFiles:
    """What `proper-fed certs create --out DIR` wrote: the CA certificate and the server's cert and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def from_dir(cls, certs: str | os.PathLike[str]) -> TlsFiles:
        folder = Path(certs).expanduser().resolve()
        files = cls(folder / CA_CERT_FILE, folder / SERVER_CERT_FILE, folder / SERVER_KEY_FILE)
        missing = [p.name for p in (files.ca_cert, files.server_cert, files.server_key) if not p.is_file()]
        if missing:
            raise ConfigError(
                f"--certs {folder}: missing {', '.join(missing)}; create them with "
                f"`proper-fed certs create --out {folder}` (or pass --insecure for a plaintext test setup)"
            )
        return files


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class SuperLinkSpec:
    """One SuperLink: where it listens, its TLS files (None = --insecure), and whether SuperNodes must
    authenticate with a registered key (needs TLS)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    tls: TlsFiles | None = None
    node_auth: bool = True
    database: Path | None = None

    def __post_init__(self) -> None:
        if self.node_auth and self.tls is None:
            raise ConfigError(
                "SuperNode authentication needs TLS: pass --certs DIR, or --no-node-auth with --insecure"
            )
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is not a TCP port (1-65535)")

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def command(self) -> list[str]:
        cmd = [executable("flower-superlink"), "--host", self.host, "--port", str(self.port)]
        if self.tls is None:
            cmd.append("--insecure")
        else:
            cmd += [
                "--ssl-ca-certfile", str(self.tls.ca_cert),
                "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key),
            ]  # fmt: skip
        if self.node_auth:
            cmd.append("--enable-supernode-auth")
        if self.database is not None:
            cmd += ["--database", str(self.database)]  # registrations survive a restart
        return [*cmd, "--disable-runtime-dependency-installation"]


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


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_for_port(
    host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None, log_path: Path | None = None
) -> None:
    """Return once `host:port` accepts connections; raise if `proc` exits first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeployError(
                f"the process exited with code {proc.returncode} before listening on "
                f"{format_address(host, port)}" + (f"; last log lines:\n{tail(log_path)}" if log_path else "")
            )
        if port_open(host, port):
            return
        time.sleep(0.3)
    raise DeployError(f"nothing listens on {format_address(host, port)} after {timeout_s:.0f} s")


# ---- background processes and pid files ----


def read_pid(path: Path) -> int | None:
    """The pid in `path` if that process is still alive, else None (a stale file is removed)."""
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if not process_alive(pid):
        path.unlink(missing_ok=True)
        return None
    return pid


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def start_background(
    cmd: Sequence[str], log_path: Path, pid_path: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.Popen:
    """Start `cmd` in its own session (it outlives this process; its children share its process group),
    output appended to `log_path`, pid written to `pid_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else flwr_env(),
            start_new_session=True,
        )
    if pid_path is not None:
        atomic_write_text(pid_path, f"{proc.pid}\n")
    log.info("started pid %d: %s", proc.pid, " ".join(cmd))
    return proc


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_process(pid: int, expect: str, timeout_s: float = 20.0) -> bool:
    """Stop process `pid` and everything it started: SIGTERM, then SIGKILL after `timeout_s`.

    `expect` must occur in its command line, so a pid reused by an unrelated process is never signalled.
    Returns False if no such process was running.
    """
    if not process_alive(pid) or expect not in _cmdline(pid):
        return False
    family = [pid, *_descendants(pid)]  # Flower's SuperExec may live in its own session
    for p in family:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(process_alive(p) for p in family):
        time.sleep(0.2)
    for p in family:
        if process_alive(p):
            _signal(p, signal.SIGKILL)
    return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ---- the flwr CLI's connection to our SuperLink ----


def flwr_home() -> Path:
    from flwr.supercore.utils import get_flwr_home

    return Path(get_flwr_home())


def write_connection(
    name: str, address: str, root_cert: Path | None, insecure: bool = False, home: Path | None = None
) -> Path:
    """Add or replace `[superlink.<name>]` in `$FLWR_HOME/config.toml`, keeping every other entry."""
    import tomli_w
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"connection name {name!r}: use letters, digits, '-' and '_'")
    path = (home or flwr_home()) / "config.toml"
    text = path.read_text() if path.exists() else DEFAULT_FLOWER_CONFIG_TOML
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise DeployError(f"{path} is not valid TOML ({err}); fix or remove it") from err
    entry: dict[str, Any] = {"address": address}
    if insecure:
        entry["insecure"] = True
    elif root_cert is not None:
        entry["root-certificates"] = str(Path(root_cert).resolve())
    config.setdefault("superlink", {})[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, tomli_w.dumps(config))
    return path


def submit_command(app_dir: Path, connection: str, run_config_file: Path, stream: bool = True) -> list[str]:
    cmd = [executable("flwr"), "run", str(app_dir), connection, "--run-config", str(run_config_file)]
    return [*cmd, "--stream"] if stream else cmd


def register_command(public_key: Path, connection: str) -> list[str]:
    return [executable("flwr"), "supernode", "register", str(public_key), connection, "--format", "json"]


def register_node(public_key: Path, connection: str, env: Mapping[str, str] | None = None) -> int:
    """Register a SuperNode's OpenSSH public key with the SuperLink; returns the node id it will have."""
    key = Path(public_key).expanduser().resolve()
    if not key.is_file():
        raise ConfigError(
            f"{key}: no such public key; the device prints its path at `proper-fed client enroll`"
        )
    proc = subprocess.run(
        register_command(key, connection), capture_output=True, text=True, env=dict(env or flwr_env())
    )
    start = proc.stdout.find("{")
    try:
        answer = json.loads(proc.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        answer = {}
    if proc.returncode != 0 or not answer.get("success"):
        # flwr draws its error in a box and names the connection first: keep only the message.
        raw = answer.get("error-message") or proc.stdout + proc.stderr
        lines = [ln.strip(" │╭╮╰╯─") for ln in str(raw).splitlines()]
        why = " ".join(ln for ln in lines if ln and not ln.startswith("Using SuperLink"))[-600:]
        raise DeployError(f"flwr supernode register {key} {connection} failed: {why}")
    return int(answer["node-id"])


def default_app_dir() -> Path:
    app = APP_DIR
    if not (app / "pyproject.toml").is_file() or "[tool.flwr.app" not in (app / "pyproject.toml").read_text():
        raise ConfigError(
            f"{app} is not the proper-fed Flower app (no pyproject.toml with [tool.flwr.app]); pass --app "
            "with the path of a proper-fed checkout"
        )
    return app


# ---- run config ----


def load_run_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A run config TOML as flat Flower keys: top-level keys and a `[run]` table as they are, other tables
    as `<table>.<key>`; a `[federation]` table (simulation only) is ignored."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"--config {p}: no such file") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {p}: not valid TOML: {err}") from err
    raw.pop("federation", None)
    run = raw.pop("run", {})
    return {**flatten_config(run), **flatten_config(raw)}


def build_run_config(
    base: Mapping[str, Any], overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], RunSettings]:
    """Merge overrides (None = unset) into base, make file paths absolute, and validate every key."""
    flat = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    for key in PATH_KEYS:
        value = flat.get(key)
        if isinstance(value, str) and value and not (key == "data" and value == BUILTIN_DATA):
            flat[key] = str(Path(value).expanduser().resolve())
    settings = RunSettings.from_run_config(flat)
    if "out" not in flat:
        flat["out"] = str(Path(settings.out).resolve())
        settings = RunSettings.from_run_config(flat)
    return flat, settings


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v) if isinstance(v, str) else repr(v)


def write_run_config(flat: Mapping[str, Any], path: Path) -> Path:
    return atomic_write_text(path, "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in flat.items()))


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """`--set key=value` items; values are TOML (numbers, true/false, quoted strings) or a bare string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. --set user.epochs=2")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out
