"""`llproxy usage`: sums as a table, or JSON."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from .report import print_json


def show_usage(rows: list[dict[str, Any]], by: str, as_json: bool) -> None:
    if as_json:
        print_json(rows)
        return
    group = {"key": "client", "model": "model", "day": "day"}[by]
    table = Table(title=f"usage by {by}")
    table.add_column(group)
    for column in ("requests", "prompt tokens", "completion tokens"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row[group]),
            str(row["requests"]),
            "-" if row["prompt_tokens"] is None else str(row["prompt_tokens"]),
            "-" if row["completion_tokens"] is None else str(row["completion_tokens"]),
        )
    Console().print(table)
    if not rows:
        Console(stderr=True).print("no usage recorded", highlight=False)
