"""Broken upstreams against a real daemon: the whole upstream-fault matrix (every fault kind,
every client dialect, streamed and not), and the worker's memory after answers cut at
`max_response_bytes`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ..fake_upstream import FAULTS, FaultyUpstream, HostileUpstream
from ..process import LlproxyProcess
from ..upstream_faults import DIALECTS, ask, judge
from .conftest import rss_mb, worker_pids
from .test_attacks import CHAT, MiB, Start, config_file, timed_get

OVERSIZE_ANSWERS = 20


async def test_memory_stays_flat_after_oversize_answers(
    aiohttp_server: Any, start_llproxy: Start, tmp_path: Path, report: Any
) -> None:
    # A whole answer a little over the default max_response_bytes (64 MiB): each is cut.
    hostile = HostileUpstream(mode="huge_body", size=65 * MiB)
    server = await aiohttp_server(hostile.app())
    config = config_file(tmp_path, server.port)
    daemon = await start_llproxy("--config", str(config), "--workers", "1")
    [worker] = worker_pids(daemon.pid)
    before = rss_mb(worker)
    after_each = []
    async with aiohttp.ClientSession() as session:
        for _ in range(OVERSIZE_ANSWERS):
            async with session.post(
                f"{daemon.url}/v1/chat/completions", json={**CHAT, "model": "hostile"}
            ) as resp:
                body = await resp.read()
            assert resp.status == 502 and b"upstream_too_large" in body
            after_each.append(rss_mb(worker))
    await asyncio.sleep(2)
    settled = rss_mb(worker)
    report(
        f"{OVERSIZE_ANSWERS} answers cut at 64 MiB",
        worker_rss_mb=f"{before} → {max(after_each)} (peak after one) → {settled} (2 s idle)",
        after_each=after_each,
    )
    assert worker_pids(daemon.pid) == [worker]
    # Less than one answer's worth stays (what the allocator keeps for the next), not
    # 64 MB more for each answer (960 MB after 15, before).
    assert settled - before < 64, after_each


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("dialect", DIALECTS)
async def test_upstream_fault_matrix(
    aiohttp_server: Any,
    start_llproxy: Start,
    tmp_path: Path,
    report: Any,
    dialect: str,
    stream: bool,
) -> None:
    """Every fault kind through one client dialect: an error in the dialect's shape (502 or
    504, or a stream ended by its error event), or the whole text where the fault leaves
    it whole; never a 200 with empty content, never a 500; the daemon serves on, with the
    same worker."""
    upstream = FaultyUpstream(hang_for=10)
    server = await aiohttp_server(upstream.app())
    timeouts = {"first_byte": 2, "idle": 2}
    # Each fault's own answer is what is judged: replica health would eject the one
    # replica after a few faults in a row (tests/test_health.py tests that) and answer
    # the rest with 503s, whatever the faults' order.
    health = {"enable": False}
    config = config_file(tmp_path, server.port, timeouts=timeouts, health=health)
    daemon: LlproxyProcess = await start_llproxy("--config", str(config), "--workers", "1")
    workers = worker_pids(daemon.pid)
    broken: list[str] = []
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        for fault in FAULTS:
            outcome = await asyncio.wait_for(ask(session, daemon.url, dialect, fault, stream), 30)
            if (problem := judge(dialect, fault, stream, outcome)) is not None:
                broken.append(f"{fault}: {problem}")
            await timed_get(daemon.url)  # serves on
    report(
        f"upstream faults, {dialect} {'streamed' if stream else 'whole'}",
        faults=len(FAULTS),
        broken=len(broken),
        seconds=round(time.monotonic() - started, 1),
    )
    assert broken == []
    assert worker_pids(daemon.pid) == workers
