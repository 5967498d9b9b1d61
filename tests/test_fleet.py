"""A fleet: three real `llproxy serve` processes sharing one PostgreSQL (keys, usage) and
one Redis (rate counts). A key made through one's CLI works on all, a revocation reaches
all, usage sums exactly over the fleet, and a database stopped mid-run loses no record."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import RunningUpstream, UpstreamFactory
from .pg_cluster import PgCluster
from .process import LlproxyProcess, run_cli

Start = Callable[..., Awaitable[LlproxyProcess]]
KEY = "static-fleet-key-0123456789"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def fleet_config(
    tmp_path: Path, upstream: RunningUpstream, name: str = "fleet.json", **top: Any
) -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"endpoints": [upstream.endpoint()], **top}))
    return str(path)


def cli(tmp_path: Path, *args: str) -> str:
    done = run_cli(*args, state=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def fleet(start: Start, config: str, count: int) -> list[LlproxyProcess]:
    return list(
        await asyncio.gather(*(start("--config", config, "--workers", "2") for _ in range(count)))
    )


async def send(
    session: aiohttp.ClientSession, daemon: LlproxyProcess, key: str, fresh: bool = False
) -> int:
    # A fresh connection may land on any worker: each keeps its own keys.
    headers = {"Authorization": f"Bearer {key}", **({"Connection": "close"} if fresh else {})}
    async with session.post(
        f"{daemon.url}/v1/chat/completions", json=CHAT, headers=headers
    ) as resp:
        await resp.read()
        return resp.status


async def spread(daemons: list[LlproxyProcess], key: str, total: int) -> Counter[int]:
    """`total` requests round the fleet, 32 at a time; their statuses."""
    gate = asyncio.Semaphore(32)
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> int:
            async with gate:
                return await send(session, daemons[i % len(daemons)], key)

        return Counter(await asyncio.gather(*(one(i) for i in range(total))))


async def fleet_usage(tmp_path: Path, config: str, want: int) -> int:
    """Requests recorded over the whole fleet, once `want` are in (or the bound ran out)."""
    deadline = time.monotonic() + 30
    while True:
        rows = json.loads(cli(tmp_path, "usage", "--config", config, "--json"))
        found = sum(row["requests"] for row in rows)
        if found >= want or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.3)


async def test_a_fleet_shares_keys_and_usage(
    start_llproxy: Start,
    start_upstream: UpstreamFactory,
    tmp_path: Path,
    database_url: str,
    redis_url: str,
) -> None:
    upstream = await start_upstream()
    config = fleet_config(
        tmp_path, upstream, database_url=database_url, redis_url=redis_url, rate_limit=None
    )
    daemons = await fleet(start_llproxy, config, 3)
    secret = cli(tmp_path, "keys", "create", "--config", config, "--name", "team").strip()
    async with aiohttp.ClientSession() as session:
        for daemon in daemons:
            deadline = time.monotonic() + 10
            while await send(session, daemon, secret, fresh=True) != 200:
                assert time.monotonic() < deadline, "the new key never worked"
                await asyncio.sleep(0.05)

    statuses = await spread(daemons, secret, 1000)
    assert statuses == Counter({200: 1000})
    # The three first answers of the new key count too.
    assert await fleet_usage(tmp_path, config, 1003) == 1003
    await asyncio.sleep(1.5)  # a second writer's batch, were any record written twice
    assert await fleet_usage(tmp_path, config, 1003) == 1003

    # Limits are exact across the fleet (Redis counts): a key of its own limit, 80
    # requests spread over the three at once.
    limited = cli(
        tmp_path, "keys", "create", "--config", config, "--name", "few", "--rate-limit", "50/minute"
    ).strip()
    await asyncio.sleep(1.0)  # every worker heard of the key
    assert await spread(daemons, limited, 80) == Counter({200: 50, 429: 30})

    cli(tmp_path, "keys", "revoke", "--config", config, "team")
    revoked = time.monotonic()
    took = []
    async with aiohttp.ClientSession() as session:
        for daemon in daemons:
            deadline = revoked + 10
            while await send(session, daemon, secret, fresh=True) != 401:
                assert time.monotonic() < deadline, "the revocation never arrived"
                await asyncio.sleep(0.05)
            took.append(time.monotonic() - revoked)
            # Every worker of it refuses now.
            for _ in range(8):
                assert await send(session, daemon, secret, fresh=True) == 401
    print(f"revocation seen by each instance after {', '.join(f'{t:.2f}' for t in took)} s")
    async with aiohttp.ClientSession() as session:
        health = await daemons[0].health(session)
    assert health["stores"]["keys"] == {"store": "postgresql", "reachable": True}
    assert health["stores"]["rate"] == {"store": "redis", "reachable": True}


@pytest.fixture
def own_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster()
    yield cluster
    cluster.destroy()


async def test_the_database_stopped_mid_run_loses_no_record(
    start_llproxy: Start,
    start_upstream: UpstreamFactory,
    tmp_path: Path,
    own_cluster: PgCluster,
) -> None:
    upstream = await start_upstream()
    config = fleet_config(tmp_path, upstream, database_url=own_cluster.url(), rate_limit=None)
    daemons = await fleet(start_llproxy, config, 2)
    secret = cli(tmp_path, "keys", "create", "--config", config, "--name", "team").strip()
    await asyncio.sleep(1.0)  # every worker heard of the key
    assert await spread(daemons, secret, 200) == Counter({200: 200})
    own_cluster.stop()
    # Served all the same: the keys are in memory, the records go to the spool.
    assert await spread(daemons, secret, 300) == Counter({200: 300})
    for daemon in daemons:
        await daemon.wait_for("spooling them to")
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 10
        while (await daemons[0].health(session))["stores"]["keys"]["reachable"] is not False:
            assert time.monotonic() < deadline, "/health never said the database is away"
            await asyncio.sleep(0.1)
    own_cluster.start()
    assert await spread(daemons, secret, 100) == Counter({200: 100})
    assert await fleet_usage(tmp_path, config, 600) == 600
    await asyncio.sleep(1.5)  # nothing written twice
    assert await fleet_usage(tmp_path, config, 600) == 600
    for daemon in daemons:
        await daemon.wait_for("spooled usage records to the database")


async def test_the_console_shows_the_stores(
    start_llproxy: Start,
    start_upstream: UpstreamFactory,
    tmp_path: Path,
    own_cluster: PgCluster,
) -> None:
    upstream = await start_upstream()
    config = fleet_config(tmp_path, upstream, database_url=own_cluster.url(), api_keys=[KEY])
    daemon = await start_llproxy("--config", config, "--workers", "1", terminal=True)
    await daemon.wait_for("stores: keys and usage in PostgreSQL")
    await daemon.wait_for("console ready")
    mark = len(daemon.output)
    daemon.write("stores\n")
    await daemon.wait_for(r"keys\s*│\s*postgresql\s*│\s*reachable", after=mark)
    await daemon.wait_for(r"rate\s*│\s*memory\s*│\s*reachable", after=mark)
    own_cluster.stop()
    async with aiohttp.ClientSession() as session:
        assert await send(session, daemon, KEY) == 200
    await daemon.wait_for("spooling them to", after=mark)
    mark = len(daemon.output)
    daemon.write("stores\n")
    spooled = r"usage\s*│\s*postgresql\s*│\s*unreachable \(1 records spooled\)"
    await daemon.wait_for(spooled, after=mark)
    daemon.write("quit\n")
    assert await daemon.wait_exit() == 0


async def test_a_reload_keeps_the_database(
    start_llproxy: Start,
    start_upstream: UpstreamFactory,
    tmp_path: Path,
    own_cluster: PgCluster,
) -> None:
    """The master writes usage to the database it started with, so the workers a
    reload starts follow that one's keys too, whatever the new file says."""
    upstream = await start_upstream()
    config = fleet_config(tmp_path, upstream, database_url=own_cluster.url())
    daemon = await start_llproxy("--config", config, "--workers", "1")
    other = own_cluster.create_database("other")
    fleet_config(tmp_path, upstream, database_url=other)  # the same file, rewritten
    mark = len(daemon.output)
    daemon.signal(signal.SIGHUP)
    await daemon.wait_for("database_url change needs a restart", after=mark)
    await daemon.wait_for("reloaded", after=mark)
    first = fleet_config(tmp_path, upstream, "first.json", database_url=own_cluster.url())
    secret = cli(tmp_path, "keys", "create", "--config", first, "--name", "kept").strip()
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 10
        while await send(session, daemon, secret, fresh=True) != 200:
            assert time.monotonic() < deadline, "the new workers left the first database"
            await asyncio.sleep(0.05)
