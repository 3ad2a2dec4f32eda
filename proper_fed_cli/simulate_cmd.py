"""`proper-fed simulate`: PROPER and every baseline in Flower's simulation runtime, then the report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from proper_fed_cli.tables import rows_table

if TYPE_CHECKING:
    from simulations.seeds import SeedsOutcome
    from simulations.simulate import Outcome

console = Console()


def simulate_cmd(
    ctx: typer.Context,
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
    server_devices: Annotated[
        int | None,
        typer.Option(
            help="Train the server stages data-parallel (DDP) on this many local GPUs (or CPU processes)."
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="The tiny model on a few users: a smoke run.")
    ] = False,
    plots: Annotated[
        bool, typer.Option(help="Draw the routing plots (loads the server model once more).")
    ] = True,
    allow_partial: Annotated[
        bool,
        typer.Option(
            "--allow-partial",
            help="Exit 0 even when some devices failed (the table then covers only the devices that answered).",
        ),
    ] = False,
    seeds: Annotated[
        list[int] | None,
        typer.Option(
            "--seeds",
            help="Repeat the whole run once per training seed (--seeds 0 1 2) into <out>/seed-<s>/, then "
            "<out>/seeds.md: means with 95 % bootstrap intervals over users and paired tests. The data split "
            "stays the same; overrides the config's `seeds`.",
        ),
    ] = None,
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh",
            help="With seeds: run every seed again, even one already finished in <out>/seed-<s>/ with the "
            "same run config (reused by default, so a stopped multi-seed run goes on where it stopped).",
        ),
    ] = False,
) -> None:
    """Run the federated PROPER pipeline and its baselines on the same users and queries."""
    from proper_fed_cli.environment import configure_library
    from simulations.seeds import SeedsOutcome
    from simulations.simulate import simulate

    configure_library()
    seed_list = _seeds(seeds, ctx.args)
    overrides = {
        "data": data,
        "task": task,
        "max-users": users,
        "backbone.model": model,
        "out": str(out) if out else None,
        "server-devices": server_devices,
    }
    with console.status("starting Flower simulation") as status:

        def show(line: str) -> None:
            status.update(line)
            console.log(line)

        name = "quick" if quick and config == "default" else config
        outcome = simulate(os.environ, name, overrides, show, plots, seed_list, fresh)
    if isinstance(outcome, SeedsOutcome):
        _show_seeds(outcome, allow_partial)
    else:
        _show_run(outcome, allow_partial)


def _seeds(given: list[int] | None, extra: list[str]) -> list[int]:
    """`--seeds 0 1 2`: click takes one value per option, the rest arrive as extra arguments."""
    if extra and not given:
        raise typer.BadParameter(f"unexpected arguments: {' '.join(extra)}", param_hint="--seeds")
    try:
        return [*(given or []), *map(int, extra)]
    except ValueError as err:
        raise typer.BadParameter(f"seeds are integers, got {' '.join(extra)}", param_hint="--seeds") from err


def _show_run(outcome: Outcome, allow_partial: bool) -> None:
    from simulations.report import by_protocol

    res = outcome.results
    users = res["users"]
    answered = res.get("answered") or f"{users['devices_answered']} of {users['devices']} devices answered"
    for protocol, methods in by_protocol(res).items():
        console.print(_table(f"{res['task']}: {answered}; scoring '{protocol}'", {**res, "methods": methods}))
    console.print(f"results: {outcome.out / 'results.json'}\nreport:  {outcome.report}")
    missing = users["devices"] - users["devices_answered"]
    if missing:
        console.print(f"[red]{answered}: the table covers only those ({missing} missing)")
        for node, why in res.get("failed", {}).items():
            console.print(f"[red]  node {node}: {why}")
        if not users["devices_answered"] or not allow_partial:
            console.print(
                "[red]error: not every device answered; rerun, or pass --allow-partial to accept it"
            )
            raise typer.Exit(1)


def _show_seeds(outcome: SeedsOutcome, allow_partial: bool) -> None:
    from simulations.seeds_report import comparison_rows, method_rows, warnings

    s = outcome.summary
    for seed, run in outcome.runs.items():
        console.print(f"seed {seed}: {run.results['answered']} ({run.out})")
    console.print(rows_table(f"{s['task']}: {s['metric']} over seeds {s['seeds']}", *method_rows(s)))
    console.print(rows_table("proper against each method, paired per user", *comparison_rows(s)))
    console.print(f"aggregate: {outcome.out / 'seeds.json'}\nreport:    {outcome.report}")
    problems = warnings(s)
    for line in problems:
        console.print(f"[red]{line}")
    if problems and not allow_partial:
        console.print("[red]error: not every device answered in every seed; rerun, or pass --allow-partial")
        raise typer.Exit(1)


def _table(title: str, res: dict) -> Table:
    from simulations.report import score_rows

    return rows_table(title, *score_rows(res))
