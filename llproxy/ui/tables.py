"""The tables and JSON the commands and the console print: models, keys, usage."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from ..core.keys import ApiKey, key_rows
from ..core.registry import Registry
from ..stores.sqlite import GROUPINGS
from ..telemetry.metrics import Telemetry


def print_json(rows: list[dict[str, Any]]) -> None:
    """A command's `--json` output: the rows as one indented JSON array on stdout."""
    sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")


def print_table(table: Table) -> None:
    """A table on stdout. On a terminal it fits the window; piped or redirected, it keeps
    its natural width, since a file has no width to fit and cut columns lose data."""
    out = Console()
    if not out.is_terminal:
        out = Console(width=out.measure(table, options=out.options.update(width=100_000)).maximum)
    out.print(table)


def models_table(registry: Registry, states: Mapping[tuple[str, str], str] | None = None) -> Table:
    """Every model with each of its replicas: name, upstream id, host:port, its server's
    dialect, tags, and with `states` (by model and host:port) each one's state."""
    table = Table(title=f"{len(registry.models)} models on {registry.servers} servers")
    columns = ("name", "upstream id", "host:port", "dialect", "tags")
    for column in (*columns, "state") if states is not None else columns:
        table.add_column(column)
    for model in registry.models.values():
        for replica in model.replicas:
            row = [
                model.name,
                replica.upstream_id,
                replica.upstream.address,
                replica.upstream.dialect,
                ", ".join(replica.upstream.tags),
            ]
            if states is not None:
                row.append(states.get((model.name, replica.upstream.address), ""))
            table.add_row(*row)
    return table


def health_states(numbers: Telemetry, workers: int) -> dict[tuple[str, str], str]:
    """Each replica's state as the serving processes hold it (their merged numbers):
    `up`, or in how many it is ejected and when its soonest trial may start."""
    states = {}
    for key, count in numbers.ejected.items():
        if not count:
            states[key] = "[green]up[/green]"
            continue
        trial = numbers.trial_in.get(key, 0.0)
        when = f"trial in {trial:.0f} s" if trial >= 1 else "trial due"
        states[key] = f"[red]ejected[/red] in {count} of {workers} workers, {when}"
    return states


def _when(stamp: float | None) -> str:
    return "" if stamp is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def show_keys(keys: list[ApiKey], as_json: bool) -> None:
    rows = key_rows(keys)
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} API keys")
    columns = ("name", "role", "fingerprint", "models", "rate limit", "status", "created")
    for column in (*columns, "expires"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"],
            row["role"],
            row["fingerprint"],
            ", ".join(row["models"]) or "*",
            row["rate_limit"] or "default",
            row["status"],
            _when(row["created"]),
            _when(row["expires"]),
        )
    print_table(table)


def show_usage(rows: list[dict[str, Any]], by: str, as_json: bool) -> None:
    if as_json:
        print_json(rows)
        return
    group = GROUPINGS[by][0]
    table = Table(title=f"usage by {by}")
    table.add_column(group)
    for column in ("requests", "prompt tokens", "completion tokens", "cut"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row[group]),
            str(row["requests"]),
            "-" if row["prompt_tokens"] is None else str(row["prompt_tokens"]),
            "-" if row["completion_tokens"] is None else str(row["completion_tokens"]),
            str(row.get("cut") or 0),  # answers llproxy cut short (a loop)
        )
    print_table(table)
    if not rows:
        Console(stderr=True).print("no usage recorded", highlight=False)
