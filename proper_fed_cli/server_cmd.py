"""`proper-fed server ...`: run the federation's server side on Flower's deployment engine.

`start` launches a real `flower-superlink` (TLS + SuperNode authentication by default) in the background and
submits the PROPER ServerApp with `flwr run`; `register-client` admits a device's public key; `run` submits
another run to the running SuperLink; `stop` ends it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from server import superlink
from server.connection import DEFAULT_CONNECTION

server_app = typer.Typer(
    help="Run the server side of a deployment (SuperLink + ServerApp).", no_args_is_help=True
)

SUPERLINK_DIR = "superlink"  # under the state dir: pid file, log, database (node registrations)

Certs = Annotated[
    Path | None,
    typer.Option("--certs", help="Folder from `proper-fed certs create` (ca.crt, server.pem, server.key)."),
]
Insecure = Annotated[
    bool, typer.Option("--insecure", help="Plaintext, no TLS and no node authentication (tests only).")
]
Connection = Annotated[
    str, typer.Option("--connection", help="Name of the SuperLink connection in $FLWR_HOME/config.toml.")
]
Out = Annotated[Path, typer.Option("--out", help="Run folder: results.json, run_config.toml, flower.log.")]
StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir", help="Server state: stages, signing key, SuperLink files. Default <out>/server."
    ),
]
Data = Annotated[
    str | None, typer.Option("--data", help="The server's own data: 'synthetic' or a LaMP/OPPU path.")
]
Model = Annotated[
    str | None, typer.Option("--model", help="Backbone: smollm2-135m, tiny, or a local model folder.")
]
MinNodes = Annotated[
    int | None, typer.Option("--min-nodes", help="Devices to wait for before the user stage.")
]
NodeWait = Annotated[
    float | None, typer.Option("--node-wait-s", help="How long to wait for --min-nodes devices.")
]
ReplyTimeout = Annotated[
    float | None,
    typer.Option(
        "--reply-timeout-s",
        help="Devices still silent after this many seconds without any reply are reported as failed.",
    ),
]
Config = Annotated[
    Path | None,
    typer.Option("--config", help="Run config TOML ([run] + sections, as simulations/configs/*.toml)."),
]
Sets = Annotated[
    list[str] | None, typer.Option("--set", help="Any run config key, e.g. --set user.epochs=2 (repeatable).")
]
AppDir = Annotated[
    Path | None, typer.Option("--app", help="The Flower app folder (default: this proper-fed checkout).")
]
Host = Annotated[str, typer.Option("--host", help="Interface the SuperLink listens on.")]
Port = Annotated[
    int, typer.Option("--port", help="The SuperLink's one HTTPS port (Fleet, Control, Runtime).")
]
NodeAuth = Annotated[
    bool, typer.Option("--node-auth/--no-node-auth", help="Only registered SuperNode keys may connect.")
]
NoRun = Annotated[
    bool, typer.Option("--no-run", help="Only start the SuperLink (register devices, then `server run`).")
]
StopAfter = Annotated[bool, typer.Option("--stop-after", help="Stop the SuperLink when the run ends.")]
ServerDevices = Annotated[
    int | None,
    typer.Option(
        help="Train the server stages data-parallel (DDP) on this many local GPUs (or CPU processes)."
    ),
]


def _env() -> dict[str, str]:
    from proper_fed.federation.processes import flwr_env

    return flwr_env(os.environ)


def _state_dir(out: Path, state_dir: Path | None) -> Path:
    return (state_dir or out / "server").expanduser().resolve()


def _runtime(out: Path, state_dir: Path | None) -> Path:
    return _state_dir(out, state_dir) / SUPERLINK_DIR


def _run_config(
    out: Path, state_dir: Path | None, config: Path | None, sets: list[str] | None, options: dict[str, Any]
) -> tuple[dict[str, Any], Any]:
    """The run config: --config file, then --set, then the named options; validated, paths absolute."""
    from proper_fed.federation.run_config import load_run_config, parse_assignments, resolve

    base = load_run_config(config).flat if config else {}
    overrides = {
        **parse_assignments(sets or []),
        "out": str(out),
        "state-dir": str(_state_dir(out, state_dir)),
        **options,
    }
    return resolve(base, overrides, search=(config.parent,) if config else ())


def _options(data, model, min_nodes, node_wait_s, reply_timeout_s) -> dict[str, Any]:  # noqa: ANN001
    return {
        "data": data,
        "backbone.model": model,
        "min-nodes": min_nodes,
        "node-wait-s": node_wait_s,
        "reply-timeout-s": reply_timeout_s,
    }


def _ensure_signing_key(settings: Any) -> Path:
    from server.signing import load_or_create_signing_key

    load_or_create_signing_key(settings.key_path, settings.public_key_path)
    return settings.public_key_path


def _submit(flat: dict[str, Any], settings: Any, connection: str, app_dir: Path | None) -> int:
    """`flwr run` the ServerApp, stream its logs (also into <out>/flower.log), summarize results.json."""
    from proper_fed.federation.run_config import rotate_results, write_run_config
    from server.connection import default_app_dir, submit_command

    out = Path(settings.out)
    results = rotate_results(out)
    cfg = write_run_config(flat, out / "run_config.toml")
    cmd = submit_command(app_dir or default_app_dir(), connection, cfg)
    typer.echo(f"submitting: {' '.join(cmd)}")
    t0 = time.perf_counter()
    code = _tee(cmd, out / "flower.log")
    if not results.exists():
        typer.secho(
            f"flwr run exited with code {code} and no results were written; see {out / 'flower.log'} and "
            f"{settings.state_path.resolve() / SUPERLINK_DIR / superlink.LOG_FILE}",
            fg=typer.colors.RED,
            err=True,
        )
        return code or 1
    _summarize(json.loads(results.read_text()), time.perf_counter() - t0)
    typer.echo(f"results: {results}")
    return 0


def _tee(cmd: list[str], log_path: Path) -> int:
    """Run `cmd`, echoing its output and writing it to `log_path`; its exit code."""
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), bufsize=1
        )
        for line in proc.stdout or ():
            typer.echo(line, nl=False)
            logf.write(line)
        return proc.wait()


def _summarize(results: dict, wall_s: float) -> None:
    users = results["users"]
    typer.echo(
        f"devices answered {users['devices_answered']}/{users['devices_connected']}; "
        f"run wall time {wall_s:.0f} s (ServerApp {results['timings']['total_s']:.0f} s)"
    )
    for node, phases in results["bytes"]["per_device"].items():
        sent = sum(p["sent"] for p in phases.values())
        got = sum(p["received"] for p in phases.values())
        typer.echo(f"  node {node}: sent {sent:,} B, received {got:,} B")
    for node, why in results["failed"].items():
        typer.secho(f"  node {node} failed: {why}", fg=typer.colors.YELLOW)


def _spec(certs: Path | None, insecure: bool, host: str, port: int, node_auth: bool, runtime: Path) -> Any:
    if certs is None and not insecure:
        raise typer.BadParameter(
            "pass --certs DIR (from `proper-fed certs create`), or --insecure", param_hint="--certs"
        )
    tls = None if insecure else superlink.TlsFiles.from_dir(certs)  # type: ignore[arg-type]
    return superlink.SuperLinkSpec(host, port, tls, node_auth and not insecure, runtime / superlink.DB_FILE)


def _announce(spec: Any, pid: int, runtime: Path, connection: str, signing_pub: Path) -> None:
    """Where the SuperLink runs, the flwr connection written for it, and what devices need."""
    from server.connection import write_connection

    tls = spec.tls
    conf = write_connection(connection, spec.address, tls.ca_cert if tls else None, insecure=tls is None)
    mode = ("TLS" if tls else "INSECURE") + (", node authentication" if spec.node_auth else "")
    typer.echo(f"SuperLink running on {spec.address} (pid {pid}, {mode}); log {runtime / superlink.LOG_FILE}")
    typer.echo(f"flwr connection {connection!r} written to {conf}")
    typer.echo(f"devices pin the server signing key: {signing_pub}")
    if tls:
        typer.echo(f"devices trust the CA: {tls.ca_cert}")
    typer.echo("admit a device: proper-fed server register-client <its node_auth_key.pub>")


@server_app.command("start")
def start(
    certs: Certs = None,
    insecure: Insecure = False,
    host: Host = "127.0.0.1",
    port: Port = superlink.DEFAULT_PORT,
    node_auth: NodeAuth = True,
    out: Out = Path("runs/deploy"),
    state_dir: StateDir = None,
    data: Data = None,
    model: Model = None,
    min_nodes: MinNodes = None,
    node_wait_s: NodeWait = None,
    reply_timeout_s: ReplyTimeout = None,
    config: Config = None,
    set_: Sets = None,
    connection: Connection = DEFAULT_CONNECTION,
    app_dir: AppDir = None,
    no_run: NoRun = False,
    stop_after: StopAfter = False,
) -> None:
    """Start a SuperLink (TLS, SuperNode authentication) and submit the PROPER ServerApp to it.

    Returns once the SuperLink accepts connections, or exits non-zero with its own error lines."""
    runtime = _runtime(out, state_dir)
    spec = _spec(certs, insecure, host, port, node_auth, runtime)
    options = _options(data, model, min_nodes, node_wait_s, reply_timeout_s)
    flat, settings = _run_config(out, state_dir, config, set_, options)
    pub = _ensure_signing_key(settings)
    proc = superlink.start(spec, runtime, _env())
    _announce(spec, proc.pid, runtime, connection, pub)
    if no_run:
        return
    try:
        code = _submit(flat, settings, connection, app_dir)
    finally:
        if stop_after:
            superlink.stop(runtime)
    raise typer.Exit(code)


@server_app.command("run")
def run(
    out: Out = Path("runs/deploy"),
    state_dir: StateDir = None,
    data: Data = None,
    model: Model = None,
    min_nodes: MinNodes = None,
    node_wait_s: NodeWait = None,
    reply_timeout_s: ReplyTimeout = None,
    config: Config = None,
    set_: Sets = None,
    connection: Connection = DEFAULT_CONNECTION,
    app_dir: AppDir = None,
    server_devices: ServerDevices = None,
) -> None:
    """Submit the PROPER ServerApp to the running SuperLink, stream its logs, and print where results are."""
    options = _options(data, model, min_nodes, node_wait_s, reply_timeout_s)
    flat, settings = _run_config(out, state_dir, config, set_, {**options, "server-devices": server_devices})
    _ensure_signing_key(settings)
    raise typer.Exit(_submit(flat, settings, connection, app_dir))


@server_app.command("register-client")
def register_client(
    public_key: Annotated[
        Path, typer.Argument(help="The device's node_auth_key.pub (OpenSSH, ECDSA P-384).")
    ],
    connection: Connection = DEFAULT_CONNECTION,
) -> None:
    """Admit a device: register its SuperNode public key (`flwr supernode register KEY.pub CONNECTION`)."""
    from server.connection import register_node

    node_id = register_node(public_key, connection, _env())
    typer.echo(f"registered {public_key} as node {node_id}")


@server_app.command("status")
def status(out: Out = Path("runs/deploy"), state_dir: StateDir = None) -> None:
    """Whether the SuperLink started by `server start` runs (exit 1 if not)."""
    runtime = _runtime(out, state_dir)
    proc = superlink.status(runtime)
    if proc is None:
        typer.echo(f"no SuperLink running from {runtime}")
        raise typer.Exit(1)
    typer.echo(f"SuperLink running (pid {proc.pid}); log {runtime / superlink.LOG_FILE}")


@server_app.command("stop")
def stop(out: Out = Path("runs/deploy"), state_dir: StateDir = None) -> None:
    """Stop the SuperLink started by `server start` and every process it started (the ServerApp too)."""
    runtime = _runtime(out, state_dir)
    pid = superlink.stop(runtime)
    if pid is None:
        typer.echo(f"no running SuperLink recorded in {runtime / superlink.PID_FILE}")
    else:
        typer.echo(f"stopped the SuperLink (pid {pid}) and its processes")
