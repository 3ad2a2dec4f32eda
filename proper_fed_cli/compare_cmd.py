"""`proper-fed compare A B`: two multi-seed runs on the same device users, method by method, paired per user."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from proper_fed_cli.tables import rows_table

console = Console()


def compare_cmd(
    a: Annotated[Path, typer.Argument(help="Run folder A (holds seeds.json from `simulate --seeds`).")],
    b: Annotated[Path, typer.Argument(help="Run folder B, on the same data and split.")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where to write the comparison (.md and .json); default: A/compared-with-<B's name>."
        ),
    ] = None,
) -> None:
    """Compare run A with run B on the device users both scored: each method's means and A minus B paired per
    user, with a bootstrap interval, Wilcoxon p and wins / losses / ties."""
    from simulations.compare import compare_runs, table_rows, write_compare_report

    summary = compare_runs(a, b)
    md, js = write_compare_report(summary, out or a / f"compared-with-{b.resolve().name}")
    title = f"{summary['task']}: A = {a}, B = {b}, {summary['users']['both']} device users in both"
    console.print(rows_table(title, *table_rows(summary)))
    console.print(f"report: {md}\njson:   {js}")
