"""`proper-fed certs ...`: TLS certificates for the SuperLink and auth keys for SuperNodes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

certs_app = typer.Typer(
    help="TLS certificates for the SuperLink and authentication keys for SuperNodes.", no_args_is_help=True
)


@certs_app.command("create")
def create(
    out: Annotated[Path, typer.Option("--out", help="Folder for ca.crt, ca.key, server.pem, server.key.")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Extra DNS name or IP for the server certificate (repeatable)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> None:
    """Create a private CA and a SuperLink certificate (SAN: localhost, 127.0.0.1, ::1 and every --host)."""
    from proper_fed.artifacts.certs import write_certs

    paths = write_certs(out, hosts=host or [], force=force)
    typer.echo(f"wrote {paths.ca_cert}, {paths.ca_key}, {paths.server_cert}, {paths.server_key}")
    typer.echo(
        f"SuperLink: flower-superlink --ssl-ca-certfile {paths.ca_cert} "
        f"--ssl-certfile {paths.server_cert} --ssl-keyfile {paths.server_key}"
    )
    typer.echo(f"SuperNode: flower-supernode --root-certificates {paths.ca_cert} ...")
    typer.echo(f"Keep {paths.ca_key} offline; devices only need {paths.ca_cert}.")


@certs_app.command("node-key")
def node_key(
    out: Annotated[Path, typer.Option("--out", help="Folder for the key pair.")],
    name: Annotated[
        str, typer.Option("--name", help="File name of the private key; the public key adds .pub.")
    ] = ("node_auth_key"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair.")] = False,
) -> None:
    """Create a SuperNode authentication key pair (ECDSA P-384, OpenSSH format, as flwr expects)."""
    from proper_fed.artifacts.certs import create_node_auth_keypair

    paths = create_node_auth_keypair(out, name=name, force=force)
    typer.echo(f"wrote {paths.private_key} (keep it on the device) and {paths.public_key}")
    typer.echo(f"register:  flwr supernode register {paths.public_key} <federation>")
    typer.echo(f"SuperNode: flower-supernode --auth-supernode-private-key {paths.private_key} ...")
    typer.echo("SuperLink: flower-superlink --enable-supernode-auth (needs TLS)")
