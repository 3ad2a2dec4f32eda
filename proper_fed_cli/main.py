"""The `proper-fed` command. Each command group lives in its own module and calls one library function."""

from __future__ import annotations

import logging
import os
import sys

import typer

from proper_fed.errors import ProperFedError

# Nothing may be fetched from a model hub at run time; telemetry off.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

app = typer.Typer(
    name="proper-fed",
    help="Federated on-device personalization of LLMs with PROPER, on Flower.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Sub-command modules register themselves on `app`; imported lazily so `--help` stays fast.
    import importlib

    for name in ("data_cmd", "bench_cmd", "certs_cmd", "server_cmd", "client_cmd", "simulate_cmd"):
        try:
            importlib.import_module(f"proper_fed_cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"proper_fed_cli.{name}":
                raise


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("PROPER_FED_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    _register()
    try:
        app()
    except ProperFedError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
