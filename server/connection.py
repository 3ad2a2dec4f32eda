"""The `flwr` CLI's side of a deployment: the named connection to our SuperLink in `$FLWR_HOME/config.toml`,
SuperNode registration, and run submission.

Flower 1.41: `flwr run APP CONNECTION` and `flwr supernode register KEY.pub CONNECTION` read CONNECTION from
`$FLWR_HOME/config.toml` (`[superlink.<name>]` with `address`, `root-certificates`, `insecure`).
"""

from __future__ import annotations

import json
import logging
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proper_fed.artifacts.certs import check_node_public_key
from proper_fed.atomic import atomic_write_text
from proper_fed.errors import ConfigError, DeployError
from proper_fed.federation.processes import executable

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[1]  # the repository root is the Flower app (pyproject [tool.flwr])
DEFAULT_CONNECTION = "proper-fed"


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
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, DEFAULT_FLOWER_CONFIG_TOML)
    try:
        config = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise DeployError(f"{path} is not valid TOML ({err}); fix or remove it") from err
    entry: dict[str, Any] = {"address": address}
    if insecure:
        entry["insecure"] = True
    elif root_cert is not None:
        entry["root-certificates"] = str(Path(root_cert).resolve())
    config.setdefault("superlink", {})[name] = entry
    atomic_write_text(path, tomli_w.dumps(config))
    return path


def submit_command(app_dir: Path, connection: str, run_config_file: Path, stream: bool = True) -> list[str]:
    cmd = [executable("flwr"), "run", str(app_dir), connection, "--run-config", str(run_config_file)]
    return [*cmd, "--stream"] if stream else cmd


def register_command(public_key: Path, connection: str) -> list[str]:
    return [executable("flwr"), "supernode", "register", str(public_key), connection, "--format", "json"]


def register_node(public_key: Path, connection: str, env: Mapping[str, str]) -> int:
    """Register a SuperNode's OpenSSH public key with the SuperLink; returns the node id it will have."""
    key = Path(public_key).expanduser().resolve()
    check_node_public_key(key)  # a private key or a file of another kind says so here, not as flwr's exit 500
    proc = subprocess.run(register_command(key, connection), capture_output=True, text=True, env=dict(env))
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
