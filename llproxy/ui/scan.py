"""`llproxy scan`: one discovery pass, shown as a progress bar and a table, or as JSON,
and what kept servers or models from being found."""

from __future__ import annotations

from typing import Any

import uvloop
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from ..backends.openai_http.discovery import ScanResult, make_scan_session, missing_models, scan
from ..config import Config
from .tables import models_table, print_json, print_table


def scan_rows(result: ScanResult) -> list[dict[str, Any]]:
    return [
        {
            "name": model.name,
            "id": replica.upstream_id,
            "hostname": replica.upstream.hostname,
            "port": replica.upstream.port,
            "dialect": replica.upstream.dialect,
            "tags": list(replica.upstream.tags),
        }
        for model in result.registry.models.values()
        for replica in model.replicas
    ]


async def _scan_once(config: Config, show_progress: bool) -> ScanResult:
    async with make_scan_session(config) as session:
        if not show_progress:
            return await scan(config, session)
        progress = Progress(
            TextColumn("probing"),
            BarColumn(),
            MofNCompleteColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        with progress:
            task = progress.add_task("probe", total=None)
            return await scan(
                config,
                session,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )


def run_scan(config: Config, as_json: bool) -> int:
    err = Console(stderr=True)
    result = uvloop.run(_scan_once(config, show_progress=err.is_terminal and not as_json))
    rows = scan_rows(result)
    if as_json:
        print_json(rows)
    elif rows:
        print_table(models_table(result.registry))
    summary = (
        f"scanned {result.probed} addresses in {result.duration_ms:.0f} ms: "
        f"{result.registry.servers} servers, {len(result.registry.models)} models"
    )
    err.print(summary if rows else f"no models found ({summary})", highlight=False)
    lines = [problem.describe() for problem in result.problems] + [
        f"{name} is not among the models found" for name in missing_models(config, result.registry)
    ]
    for line in lines:
        err.print(f"[yellow]{escape(line)}[/yellow]", highlight=False)
    return 0
