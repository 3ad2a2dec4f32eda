"""The one way the CLI prints a table of rows: the first column left-aligned, the numbers right-aligned."""

from __future__ import annotations

from rich.table import Table


def rows_table(title: str, head: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    table.add_column(head[0])
    for k in head[1:]:
        table.add_column(k, justify="right")
    for row in rows:
        table.add_row(*row)
    return table
