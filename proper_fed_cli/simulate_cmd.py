"""`proper-fed simulate`: PROPER and every baseline in Flower's simulation runtime, then the report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from proper_fed_cli.main import app

console = Console()


@app.command("simulate")
def simulate_cmd(
    config: Annotated[
        str,
        typer.Option(
            help="A config name under simulations/configs (default, quick, numpy-commit-tags) or a TOML file."
        ),
    ] = "default",
    data: Annotated[
        str | None, typer.Option(help="'synthetic' or a LaMP / OPPU path (overrides the config).")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Task name or custom task spec .toml.")] = None,
    users: Annotated[int | None, typer.Option(help="Use at most this many users (seeded sample).")] = None,
    model: Annotated[str | None, typer.Option(help="'smollm2-135m', 'tiny' or a local model folder.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (results.json, report.md, plots).")] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="The tiny model on a few users: a smoke run.")
    ] = False,
    plots: Annotated[
        bool, typer.Option(help="Draw the routing plots (loads the server model once more).")
    ] = True,
) -> None:
    """Run the federated PROPER pipeline and its baselines on the same users and queries."""
    from simulations.report import ordered_methods
    from simulations.simulate import simulate

    overrides = {
        "data": data,
        "task": task,
        "max-users": users,
        "backbone.model": model,
        "out": str(out) if out else None,
    }
    with console.status("starting Flower simulation") as status:

        def show(line: str) -> None:
            status.update(line)
            console.log(line)

        outcome = simulate("quick" if quick and config == "default" else config, overrides, show, plots)
    res = outcome.results
    metric_names = sorted({k for m in res["methods"].values() for k in m["metrics"]})
    table = Table(title=f"{res['task']}: {res['users']['devices_answered']} device users")
    table.add_column("method")
    for k in metric_names:
        table.add_column(k, justify="right")
    for name in ordered_methods(res):
        table.add_row(
            name, *(f"{res['methods'][name]['metrics'].get(k, float('nan')):.3f}" for k in metric_names)
        )
    console.print(table)
    if res.get("failed"):
        console.print(f"[red]{len(res['failed'])} device(s) failed; see {outcome.report}")
        for node, why in list(res["failed"].items())[:5]:
            console.print(f"[red]  node {node}: {why}")
    if not res["users"]["devices_answered"]:
        raise typer.Exit(1)
    console.print(f"results: {outcome.out / 'results.json'}\nreport:  {outcome.report}")
