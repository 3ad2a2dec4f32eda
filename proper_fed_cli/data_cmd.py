"""`proper-fed data ...`: inspect a dataset, write the synthetic one, list tasks."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from proper_fed.data import SyntheticConfig, builtin_tasks, generate_synthetic, inspect_dataset, load_dataset
from proper_fed.data.inspect import DatasetStats
from proper_fed.data.synthetic import write_synthetic
from proper_fed.errors import ProperFedError

data_app = typer.Typer(
    name="data", help="Inspect LaMP-style datasets and generate the synthetic one.", no_args_is_help=True
)


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    # main() does this for the installed command; doing it here too gives the same one-line message and
    # exit code when the app is driven directly (tests, other entry points).
    try:
        yield
    except ProperFedError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _fmt(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3f}"


def _print_stats(stats: DatasetStats, console: Console) -> None:
    overview = Table(show_header=False)
    overview.add_row("source", stats.source)
    overview.add_row("task", f"{stats.task} ({stats.task_type})")
    users = f"{stats.users} ({stats.server_users} server-side in the source)" if stats.server_users else ""
    overview.add_row("users", users or str(stats.users))
    overview.add_row("queries", f"{stats.queries} ({stats.queries_with_gold} with gold)")
    overview.add_row("profile items", str(stats.profile_items))
    console.print(overview)

    spread = Table(title="per user")
    spread.add_column("")
    keys = list(stats.items_per_user)
    for key in keys:
        spread.add_column(key, justify="right")
    spread.add_row("profile items", *(_fmt(stats.items_per_user[k]) for k in keys))
    spread.add_row("queries", *(_fmt(stats.queries_per_user[k]) for k in keys))
    console.print(spread)

    if stats.profile_labels or stats.gold_labels:
        labels = Table(title="labels")
        labels.add_column("label")
        labels.add_column("profile", justify="right")
        labels.add_column("%", justify="right")
        labels.add_column("queries", justify="right")
        labels.add_column("%", justify="right")
        n_items = sum(stats.profile_labels.values()) or 1
        n_golds = sum(stats.gold_labels.values()) or 1
        for label in dict.fromkeys([*stats.profile_labels, *stats.gold_labels]):
            g = stats.gold_labels.get(label, 0)
            if stats.profile_labels:
                p = stats.profile_labels.get(label, 0)
                profile = (str(p), f"{100 * p / n_items:.1f}")
            else:  # the task's history items carry no label (LaMP-1)
                profile = ("-", "-")
            labels.add_row(label, *profile, str(g), f"{100 * g / n_golds:.1f}")
        console.print(labels)

    if stats.baselines:
        base = Table(title="baselines on the queries")
        base.add_column("baseline")
        metric_names = [k for k in next(iter(stats.baselines.values())) if k != "label"]
        for name in metric_names:
            base.add_column(name, justify="right")
        for name, values in stats.baselines.items():
            title = f"{name} ({values['label']})" if "label" in values else name
            base.add_row(title, *(f"{values[m]:.3f}" for m in metric_names))
        console.print(base)


@data_app.command("inspect")
def inspect_cmd(
    path: Annotated[
        Path, typer.Argument(help="LaMP questions file, a folder with one, or an OPPU task folder.")
    ],
    task: Annotated[str | None, typer.Option(help="Task name, e.g. LaMP-2 (default: detected).")] = None,
    spec: Annotated[
        Path | None, typer.Option(help="Custom task spec (TOML); see docs/data.md.", dir_okay=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON.")] = False,
) -> None:
    """Users, queries, history lengths, label distribution and label baselines of a dataset."""
    with _reported():
        stats = inspect_dataset(load_dataset(path, task=task, spec=spec))
    if as_json:
        typer.echo(json.dumps(stats.to_dict(), indent=2))
    else:
        _print_stats(stats, Console())


@data_app.command("synth")
def synth_cmd(
    out: Annotated[Path, typer.Option(help="Folder to write questions.json, outputs.json, task.toml into.")],
    users: Annotated[int, typer.Option(help="Number of users.")] = SyntheticConfig.users,
    groups: Annotated[int, typer.Option(help="Latent groups.")] = SyntheticConfig.groups,
    labels: Annotated[int, typer.Option(help="Label-set size (2-8).")] = SyntheticConfig.labels,
    topics: Annotated[int, typer.Option(help="Topic vocabulary size (2-12).")] = SyntheticConfig.topics,
    min_history: Annotated[int, typer.Option(help="Shortest history.")] = SyntheticConfig.min_history,
    max_history: Annotated[int, typer.Option(help="Longest history.")] = SyntheticConfig.max_history,
    min_queries: Annotated[int, typer.Option(help="Fewest queries per user.")] = SyntheticConfig.min_queries,
    max_queries: Annotated[int, typer.Option(help="Most queries per user.")] = SyntheticConfig.max_queries,
    noise: Annotated[float, typer.Option(help="Share of labels drawn at random.")] = SyntheticConfig.noise,
    seed: Annotated[int, typer.Option(help="Random seed.")] = SyntheticConfig.seed,
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
) -> None:
    """Write the synthetic latent-group dataset in LaMP layout (atomically) and print its ceilings."""
    with _reported():
        config = SyntheticConfig(
            users=users,
            groups=groups,
            labels=labels,
            topics=topics,
            min_history=min_history,
            max_history=max_history,
            min_queries=min_queries,
            max_queries=max_queries,
            noise=noise,
            seed=seed,
        )
        data = generate_synthetic(config)
        write_synthetic(data, out, force=force)
    console = Console()
    console.print(f"wrote {len(data.dataset.users)} users, {len(data.dataset.queries)} queries to {out}")
    table = Table(title="query accuracy of the planted rules and baselines")
    table.add_column("predictor")
    table.add_column("accuracy", justify="right")
    for name, value in data.ceilings().items():
        table.add_row(name, f"{value:.3f}")
    console.print(table)


@data_app.command("tasks")
def tasks_cmd() -> None:
    """List the built-in tasks and their aliases."""
    table = Table(title="tasks")
    for column in ("name", "type", "aliases", "description"):
        table.add_column(column)
    for spec in builtin_tasks():
        table.add_row(spec.name, spec.type, ", ".join(spec.aliases), spec.description)
    Console().print(table)
