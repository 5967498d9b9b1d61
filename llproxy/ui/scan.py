"""`llproxy scan`: one discovery pass, shown as a progress bar and a table, or as JSON,
and what kept servers or models from being found."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp
import uvloop
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from ..backends.openai_http.discovery import ScanResult, make_scan_session, missing_models, scan
from ..backends.probe import probe
from ..config import Config
from .tables import models_table, print_json, print_table


def scan_rows(result: ScanResult, states: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """A row per replica; with `states` (by base URL), each one's state."""
    return [
        {
            "name": model.name,
            "id": replica.upstream_id,
            "hostname": replica.upstream.hostname,
            "port": replica.upstream.port,
            "dialect": replica.upstream.dialect,
            "tags": list(replica.upstream.tags),
        }
        | ({} if states is None else {"state": states.get(replica.upstream.base_url, "")})
        for model in result.registry.models.values()
        for replica in model.replicas
    ]


async def _scan_once(config: Config, show_progress: bool) -> tuple[ScanResult, dict[str, str]]:
    async with make_scan_session(config) as session:
        if not show_progress:
            result = await scan(config, session)
        else:
            progress = Progress(
                TextColumn("probing"),
                BarColumn(),
                MofNCompleteColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            with progress:
                task = progress.add_task("probe", total=None)
                result = await scan(
                    config,
                    session,
                    progress=lambda done, total: progress.update(task, completed=done, total=total),
                )
        return result, await _states(config, result, session)


async def _states(
    config: Config, result: ScanResult, session: aiohttp.ClientSession
) -> dict[str, str]:
    """Each server's state by base URL, as this scan saw it: `up` when it listed its
    models; a server whose models the config names was not asked for them, so it gets a
    light probe of its own (probe.py), the one a serving llproxy uses."""
    named = {e.url for e in config.endpoints if e.url is not None and e.models is not None}
    upstreams = {r.upstream for m in result.registry.models.values() for r in m.replicas}
    probed = [u for u in upstreams if u.base_url in named]
    answers = await asyncio.gather(*(probe(session, u, config.timeouts.scan) for u in probed))
    states = {url: "up" for url in result.listed - named}
    states |= {
        u.base_url: "up" if why is None else f"down: {why}"
        for u, why in zip(probed, answers, strict=True)
    }
    return states


def run_scan(config: Config, as_json: bool) -> int:
    err = Console(stderr=True)
    result, states = uvloop.run(_scan_once(config, show_progress=err.is_terminal and not as_json))
    rows = scan_rows(result, states)
    if as_json:
        print_json(rows)
    elif rows:
        by_replica = {
            (m.name, r.upstream.address): _coloured(states.get(r.upstream.base_url, ""))
            for m in result.registry.models.values()
            for r in m.replicas
        }
        print_table(models_table(result.registry, by_replica))
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


def _coloured(state: str) -> str:
    if state == "up":
        return "[green]up[/green]"
    return f"[red]{escape(state)}[/red]" if state else ""
