"""The `proper-fed` command: every command registered here, explicitly; each lives in its own module, parses
its options and calls one library function. Heavy modules (torch, flwr, transformers) are imported inside the
commands, so `proper-fed --help` stays fast.

This is the outermost edge: the only place (with the Flower app entry points) that reads the environment.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from proper_fed.errors import ProperFedError
from proper_fed_cli import bench_cmd, certs_cmd, client_cmd, compare_cmd, data_cmd, server_cmd, simulate_cmd

app = typer.Typer(
    name="proper-fed",
    help="Federated on-device personalization of LLMs with PROPER, on Flower.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(data_cmd.data_app, name="data")
app.command("bench")(bench_cmd.bench)
app.add_typer(certs_cmd.certs_app, name="certs")
app.add_typer(server_cmd.server_app, name="server")
app.add_typer(client_cmd.client_app, name="client")
# `--seeds 0 1 2`: click gives an option one value; the other seeds arrive as extra arguments (simulate_cmd._seeds)
app.command("simulate", context_settings={"allow_extra_args": True})(simulate_cmd.simulate_cmd)
app.command("compare")(compare_cmd.compare_cmd)


def main() -> None:
    # Nothing may be fetched from a model hub at run time; telemetry off (inherited by every process we start).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logging.basicConfig(
        level=os.environ.get("PROPER_FED_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        app()
    except ProperFedError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
