"""`proper-fed client ...`: the device side of a deployment.

`enroll` makes the device's SuperNode key pair, pins the server's signing key and CA, prints the command the
operator runs to admit it, then starts a `flower-supernode`; `start` restarts an enrolled device; `stop` ends
a background SuperNode; `generate` answers a prompt with the device's stored (encrypted) adapter.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from client import supernode
from client.enroll import Enrollment, enroll, load_enrollment, register_hint
from proper_fed_cli.environment import configure_library

client_app = typer.Typer(
    help="Run the device side of a deployment (SuperNode + ClientApp).", no_args_is_help=True
)

Store = Annotated[
    Path, typer.Option("--store", help="The device's folder: encrypted adapters, keys, pinned server keys.")
]
Port = Annotated[
    int | None,
    typer.Option("--port", help="Local port of this SuperNode's runtime API (default: a free port)."),
]
Threads = Annotated[int | None, typer.Option("--threads", help="CPU threads the ClientApp may use.")]
Background = Annotated[
    bool,
    typer.Option(
        "--background",
        help=f"Detach once connected; log and pid in <store>/{supernode.LOG_FILE}, {supernode.PID_FILE}.",
    ),
]
ConnectTimeout = Annotated[
    float,
    typer.Option(
        "--connect-timeout",
        help="--background: give up (and stop it) if not connected after this many seconds.",
    ),
]
MaxRetries = Annotated[
    int | None,
    typer.Option(
        "--max-retries", help="Give up after this many failed connection attempts (default: never)."
    ),
]


def _default_store(user_id: str) -> Path:
    from proper_fed.model.backbone import cache_dir

    return cache_dir() / "device" / (user_id or "default")


def _run_supernode(
    enrollment: Enrollment,
    port: int | None,
    threads: int | None,
    background: bool,
    max_retries: int | None,
    connect_timeout_s: float = 60.0,
) -> None:
    """Start the SuperNode; return once it is connected (--background), else stream its log until it exits."""
    from proper_fed.federation.processes import flwr_env, free_port

    store = Path(enrollment.store)
    port = port or free_port()
    cmd = enrollment.supernode_command(port, max_retries=max_retries)
    env = flwr_env(os.environ, {"PROPER_FED_THREADS": str(threads)} if threads else None)
    typer.echo(f"starting SuperNode (runtime API 127.0.0.1:{port}) -> {enrollment.superlink}")
    if background:
        run = supernode.start(cmd, store, env, detach=True, connect_timeout_s=connect_timeout_s)
        typer.echo(f"SuperNode connected (pid {run.proc.pid}); log {store / supernode.LOG_FILE}")
        return
    # A SIGTERM to us stops the SuperNode and what it started (Ctrl-C reaches them through the terminal).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run = supernode.start(cmd, store, env, detach=False, connect_timeout_s=None, on_line=typer.echo)
    except KeyboardInterrupt:
        supernode.stop(store)
        raise typer.Exit(130) from None
    raise typer.Exit(supernode.follow(run, store, typer.echo))


@client_app.command("enroll")
def enroll_cmd(
    data: Annotated[
        Path, typer.Option("--data", help="This user's own data (LaMP-layout questions file or folder).")
    ],
    server_key: Annotated[
        Path, typer.Option("--server-key", help="The server's bundle-signing key (signing.pub).")
    ],
    superlink: Annotated[str, typer.Option("--superlink", help="The SuperLink address, HOST:PORT.")],
    root_cert: Annotated[
        Path | None,
        typer.Option("--root-cert", help="The CA certificate (ca.crt) that signed the SuperLink's."),
    ] = None,
    user_id: Annotated[str, typer.Option("--user-id", help="Which user of --data this device serves.")] = "",
    task: Annotated[
        str, typer.Option("--task", help="Task name or spec .toml (default: detect from the data).")
    ] = "",
    store: Annotated[
        Path | None,
        typer.Option("--store", help="Device folder (default ~/.cache/proper-fed/device/<user>)."),
    ] = None,
    base_folder: Annotated[
        str,
        typer.Option("--base-folder", help="A local model folder to match the bundle's base hash against."),
    ] = "",
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plaintext, no node authentication (tests only).")
    ] = False,
    repin: Annotated[
        bool, typer.Option("--repin", help="Trust a new server key / CA in place of the pinned one.")
    ] = False,
    no_federated_training: Annotated[
        bool,
        typer.Option(
            "--no-federated-training",
            help="Do not train stages 1-2 when a run trains them federated (server-data = federated).",
        ),
    ] = False,
    no_start: Annotated[
        bool, typer.Option("--no-start", help="Only create keys and pin the server's; do not start.")
    ] = False,
    port: Port = None,
    threads: Threads = None,
    background: Background = False,
    max_retries: MaxRetries = None,
    connect_timeout: ConnectTimeout = 60.0,
) -> None:
    """Enroll this device: node key pair, pinned server keys, then start its SuperNode."""
    configure_library()
    enrollment, created = enroll(
        store or _default_store(user_id), data, server_key, superlink, root_cert, user_id=user_id, task=task,
        insecure=insecure, base_folder=base_folder, repin=repin, federated_training=not no_federated_training,
    )  # fmt: skip
    typer.echo(f"device store: {enrollment.store} (user {enrollment.user_id})")
    if not insecure:
        typer.echo(f"{'created' if created else 'using'} node key pair; public key: {enrollment.public_key}")
        typer.echo(f"operator, admit this device with:\n  {register_hint(enrollment.public_key)}")
    if no_start:
        typer.echo(f"start later with: proper-fed client start --store {enrollment.store}")
        return
    _run_supernode(enrollment, port, threads, background, max_retries, connect_timeout)


@client_app.command("start")
def start_cmd(
    store: Store,
    port: Port = None,
    threads: Threads = None,
    background: Background = False,
    max_retries: MaxRetries = None,
    connect_timeout: ConnectTimeout = 60.0,
) -> None:
    """(Re)start the SuperNode of an enrolled device; an interrupted user stage resumes from its checkpoint.

    Returns (--background) or streams its log once connected; exits non-zero with the SuperNode's own reason
    if it cannot connect, and waits out the SuperLink's heartbeat window after a recent crash."""
    _run_supernode(load_enrollment(store), port, threads, background, max_retries, connect_timeout)


@client_app.command("status")
def status_cmd(store: Store) -> None:
    """Whether this device's SuperNode runs (exit 1 if not)."""
    proc = supernode.status(store.expanduser().resolve())
    if proc is None:
        typer.echo(f"no SuperNode running for {store}")
        raise typer.Exit(1)
    typer.echo(f"SuperNode running (pid {proc.pid}); log {store / supernode.LOG_FILE}")


@client_app.command("stop")
def stop_cmd(store: Store) -> None:
    """Stop this device's SuperNode and every process it started (its ClientApp too)."""
    pid = supernode.stop(store.expanduser().resolve())
    if pid is None:
        typer.echo(f"no running SuperNode recorded in {store / supernode.PID_FILE}")
    else:
        typer.echo(f"stopped the SuperNode (pid {pid}) and its processes")


@client_app.command("generate")
def generate_cmd(
    store: Store,
    prompt: Annotated[str, typer.Option("--prompt", help="The text to answer.")],
    user_id: Annotated[
        str, typer.Option("--user-id", help="Whose adapter (default: the enrolled user).")
    ] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")] = 48,
    quantization: Annotated[
        str, typer.Option("--quantization", help="nf4 (4-bit, as trained) or none.")
    ] = "nf4",
    base_folder: Annotated[
        str, typer.Option("--base-folder", help="A local folder holding the base model.")
    ] = "",
) -> None:
    """Answer a prompt on the device with the user's stored adapter over the verified bundle."""
    from client.enroll import answer

    configure_library()
    text = answer(store, prompt, user_id, max_new_tokens, quantization, base_folder)
    typer.echo(text if text else "(the model produced an empty answer)")
