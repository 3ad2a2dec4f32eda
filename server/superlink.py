"""The SuperLink of a deployment: its command line, and start / stop / status as a background process whose
pid, log and database live in one folder (`<state-dir>/superlink`). `start` returns only once the SuperLink
accepts connections on its port, or raises with the SuperLink's own last error lines.

Flower 1.41: one HTTPS port per SuperLink (Fleet, Control and Runtime APIs); TLS with `--ssl-ca-certfile
--ssl-certfile --ssl-keyfile`; SuperNode authentication (`--enable-supernode-auth`) needs TLS.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from proper_fed.artifacts.certs import CA_CERT_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE
from proper_fed.errors import ConfigError, DeployError
from proper_fed.federation.processes import (
    LogFollower,
    executable,
    format_address,
    port_open,
    read_pid,
    spawn,
    stop_recorded,
    stop_tree,
    wait_until,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 9093
PID_FILE, LOG_FILE, DB_FILE = "superlink.pid", "superlink.log", "superlink.db"
EXECUTABLE = "flower-superlink"


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
        cmd = [executable(EXECUTABLE), "--host", self.host, "--port", str(self.port)]
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


def status(runtime: Path) -> psutil.Process | None:
    """The SuperLink started from `runtime` if it still runs."""
    return read_pid(runtime / PID_FILE, EXECUTABLE)


def start(
    spec: SuperLinkSpec, runtime: Path, env: Mapping[str, str], timeout_s: float = 60
) -> psutil.Process:
    """Start the SuperLink in the background; return once its port accepts connections."""
    running = status(runtime)
    if running is not None:
        raise DeployError(
            f"a SuperLink from {runtime} is already running (pid {running.pid}); use `proper-fed server run` "
            f"or `proper-fed server stop --state-dir {runtime.parent}`"
        )
    if port_open(spec.host, spec.port):
        raise DeployError(f"something already listens on {spec.address}; choose another --port")
    runtime.mkdir(parents=True, exist_ok=True)
    follower = LogFollower(runtime / LOG_FILE)
    proc = spawn(spec.command(), runtime / LOG_FILE, env, detach=True, pid_path=runtime / PID_FILE)
    why = wait_until(lambda: port_open(spec.host, spec.port), proc, follower, timeout_s)
    if why is not None:
        stop_tree(proc, timeout_s=5)
        (runtime / PID_FILE).unlink(missing_ok=True)
        raise DeployError(
            f"the SuperLink {why} before listening on {spec.address}:\n{follower.reason()}\n"
            f"(full log: {runtime / LOG_FILE})"
        )
    return proc


def stop(runtime: Path) -> int | None:
    """Stop the SuperLink started from `runtime` and every process it started; its pid, or None."""
    return stop_recorded(runtime / PID_FILE, EXECUTABLE)
