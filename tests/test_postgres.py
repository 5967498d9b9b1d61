"""PostgreSQL as the store of keys and usage (database_url), against a real cluster:
migrations safe when hosts start together, keys shared at once, usage written in batches
and spooled while the database is away, /health naming the stores."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest

from llproxy.core.keys import KeyRing
from llproxy.core.usage import UsageRecord
from llproxy.stores.postgres import (
    RELOAD_SECONDS,
    SCHEMA_VERSION,
    PostgresKeySync,
    PostgresUsageWriter,
    connect,
    upgrade,
)

from .conftest import ProxyFactory, RunningProxy, RunningUpstream
from .pg_cluster import PgCluster
from .process import run_cli

ADMIN = "admin-secret-0123456789"


def record(client: str = "alice", tokens: int = 3) -> UsageRecord:
    return UsageRecord(time.time(), client, "fake-model", "up", 200, tokens, 1, 5.0)


async def chat(proxy: RunningProxy, key: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}"},
        ) as resp,
    ):
        return resp.status


async def until(check: Any, bound: float = 10.0) -> None:
    """Poll an async check until true; `bound` only says when it hung."""
    deadline = time.monotonic() + bound
    while not await check():
        assert time.monotonic() < deadline, "did not happen"
        await asyncio.sleep(0.05)


async def test_hosts_starting_together_migrate_once(database_url: str) -> None:
    conns = [await connect(database_url) for _ in range(6)]
    try:
        results = await asyncio.gather(*(upgrade(conn) for conn in conns))
        assert all(now == SCHEMA_VERSION for _, now in results)
        # Exactly one of them found the empty database and made the schema.
        assert sorted(found for found, _ in results) == [0] + [SCHEMA_VERSION] * 5
        versions = await conns[0].fetch("SELECT version FROM llproxy_schema ORDER BY 1")
        assert [row["version"] for row in versions] == list(range(1, SCHEMA_VERSION + 1))
    finally:
        for conn in conns:
            await conn.close()


def fleet_config(tmp_path: Path, database_url: str, name: str = "c.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"endpoints": [], "database_url": database_url}))
    return path


def cli(tmp_path: Path, *args: str) -> Any:
    return run_cli(*args, state=tmp_path)


def test_db_upgrade_and_keys_commands(tmp_path: Path, database_url: str) -> None:
    config = str(fleet_config(tmp_path, database_url))
    done = cli(tmp_path, "db", "upgrade", "--config", config)
    assert done.returncode == 0, done.stderr
    assert f"from version 0 to {SCHEMA_VERSION}" in done.stderr
    again = cli(tmp_path, "db", "upgrade", "--config", config)
    assert f"at version {SCHEMA_VERSION}" in again.stderr
    created = cli(tmp_path, "keys", "create", "--config", config, "--name", "ci")
    assert created.returncode == 0 and "shared database" in created.stderr
    listed = cli(tmp_path, "keys", "list", "--config", config, "--json")
    assert [row["name"] for row in json.loads(listed.stdout)] == ["ci"]
    # Nothing went to the state directory's SQLite.
    assert not (tmp_path / "llproxy.db").exists()
    revoked = cli(tmp_path, "keys", "revoke", "--config", config, "ci")
    assert revoked.returncode == 0, revoked.stderr
    twice = cli(tmp_path, "keys", "revoke", "--config", config, "ci")
    assert twice.returncode != 0 and "no active key" in twice.stderr


async def test_a_key_made_on_one_host_works_on_the_other_at_once(
    start_proxy: ProxyFactory, upstream: RunningUpstream, tmp_path: Path, database_url: str
) -> None:
    one, other = [
        await start_proxy(
            [upstream.endpoint()],
            database_url=database_url,
            admin_key=ADMIN,
            state_dir=str(tmp_path / name),
        )
        for name in ("one", "other")
    ]
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as admin,
        admin.post(f"{one.url}/admin/keys", json={"name": "web"}) as resp,
    ):
        assert resp.status == 201
        secret = (await resp.json())["key"]

    answered = 0  # requests that reached the model: each leaves a usage record

    async def accepted() -> bool:
        nonlocal answered
        answered += await chat(other, secret) == 200
        return answered > 0

    await until(accepted)
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as admin,
        admin.delete(f"{other.url}/admin/keys/web") as resp,
    ):
        assert resp.status == 200

    async def refused() -> bool:
        nonlocal answered
        status = await chat(one, secret)
        answered += status == 200
        return status == 401

    await until(refused)
    # Both hosts' records in the one database, summed by either.
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as admin,
    ):

        async def summed() -> bool:
            async with admin.get(f"{other.url}/admin/usage?by=key") as resp:
                rows = (await resp.json())["data"]
            return [(r["client"], r["requests"]) for r in rows] == [("web", answered)]

        await until(summed)


async def test_a_change_is_heard_not_waited_for(database_url: str) -> None:
    """A key written by anyone (here plain SQL) reaches a follower on the notice, long
    before its next periodic reload (RELOAD_SECONDS after the first read)."""
    ring = KeyRing()
    sync = PostgresKeySync(ring, database_url)
    sync.start()
    try:
        assert await sync.loaded(10)
        conn = await connect(database_url)
        try:
            await conn.execute(
                "INSERT INTO api_keys (name, key_hash, models, created) "
                "VALUES ('sql', 'abc', '[]', 0)"
            )
        finally:
            await conn.close()
        written = time.monotonic()

        async def heard() -> bool:
            return any(key.name == "sql" for key in ring.keys.values())

        await until(heard, bound=RELOAD_SECONDS - 2)
        print(f"heard after {time.monotonic() - written:.3f} s")
    finally:
        await sync.close()


async def test_health_names_the_stores(
    start_proxy: ProxyFactory,
    upstream: RunningUpstream,
    database_url: str,
    redis_url: str,
) -> None:
    proxy = await start_proxy([upstream.endpoint()], database_url=database_url, redis_url=redis_url)

    async def stores() -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{proxy.url}/health") as resp,
        ):
            found: dict[str, Any] = (await resp.json())["stores"]
            return found

    async def all_answered() -> bool:
        return all(s["reachable"] for s in (await stores()).values())

    await until(all_answered)
    assert {name: s["store"] for name, s in (await stores()).items()} == {
        "keys": "postgresql",
        "usage": "postgresql",
        "rate": "redis",
        "desk": "redis",  # with redis_url, the fleet's desk
    }


async def test_health_of_a_single_host(proxy: RunningProxy) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/health") as resp:
        stores = (await resp.json())["stores"]
    assert stores["keys"]["store"] == "sqlite" and stores["rate"]["store"] == "memory"


@pytest.fixture
def own_cluster() -> Iterator[PgCluster]:
    """A cluster this test may stop and start."""
    cluster = PgCluster()
    yield cluster
    cluster.destroy()


async def count(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM usage"))
    finally:
        await conn.close()


async def test_records_spool_while_the_database_is_away(
    own_cluster: PgCluster, tmp_path: Path
) -> None:
    url = own_cluster.url()
    spool = tmp_path / "spool.jsonl"
    writer = PostgresUsageWriter(url, spool)
    writer.add([record() for _ in range(10)])
    await writer.flush()
    assert writer.telemetry.written == 10 and not spool.exists()
    own_cluster.stop()
    writer.add([record() for _ in range(25)])
    await writer.flush()
    writer.add([record() for _ in range(5)])
    await writer.flush()
    assert writer.telemetry.spooled == 30 and writer.reachable is False
    assert len(spool.read_bytes().splitlines()) == 30
    own_cluster.start()
    await writer.flush()
    assert writer.telemetry.spooled == 0 and writer.reachable is True
    assert not spool.exists()
    await writer.close()
    assert await count(url) == 40


async def test_a_spool_left_by_a_stopped_host_is_written_once(
    own_cluster: PgCluster, tmp_path: Path
) -> None:
    """A host stopped while the database was away writes its spool at the next start;
    a spool written again (the outcome of a write lost with the connection) adds
    nothing twice."""
    url = own_cluster.url()
    spool = tmp_path / "spool.jsonl"
    own_cluster.stop()
    writer = PostgresUsageWriter(url, spool)
    writer.start()
    writer.add([record() for _ in range(7)])
    await writer.close()
    kept = spool.read_bytes()
    assert len(kept.splitlines()) == 7
    own_cluster.start()
    for _ in range(2):
        spool.write_bytes(kept)
        again = PostgresUsageWriter(url, spool)
        assert again.telemetry.spooled == 7
        again.start()
        await again.close()
        assert not spool.exists()
    assert await count(url) == 7


async def test_writers_sharing_a_state_directory_share_its_spool(
    own_cluster: PgCluster, tmp_path: Path
) -> None:
    """Two llproxy on one state directory spool to one file and both drain it: every
    record is written once, no file is left."""
    url = own_cluster.url()
    spool = tmp_path / "spool.jsonl"
    one, other = PostgresUsageWriter(url, spool), PostgresUsageWriter(url, spool)
    own_cluster.stop()
    for writer in (one, other):
        writer.add([record() for _ in range(20)])
        await writer.flush()
    own_cluster.start()
    for _ in range(5):
        one.add([record() for _ in range(10)])
        other.add([record() for _ in range(10)])
        await asyncio.gather(one.flush(), other.flush())
    await asyncio.gather(one.close(), other.close())
    assert await count(url) == 140
    assert sorted(os.listdir(tmp_path)) == []


async def test_a_full_spool_drops_and_counts(own_cluster: PgCluster, tmp_path: Path) -> None:
    own_cluster.stop()
    writer = PostgresUsageWriter(own_cluster.url(), tmp_path / "spool.jsonl", max_spool=2000)
    for _ in range(5):
        writer.add([record() for _ in range(10)])
        await writer.flush()
    assert writer.telemetry.spooled > 0 and writer.telemetry.dropped > 0
    assert writer.telemetry.spooled + writer.telemetry.dropped == 50
    await writer.close()


async def test_usage_sums_by_day_key_and_model(database_url: str, tmp_path: Path) -> None:
    writer = PostgresUsageWriter(database_url, tmp_path / "spool.jsonl")
    writer.add([record("alice", 2), record("alice", 3)._replace(cut="loop"), record("bob", 4)])
    writer.add([record("bob", 4)._replace(prompt_tokens=None)])
    await writer.flush()
    await writer.close()
    config = str(fleet_config(tmp_path, database_url))
    by_key = cli(tmp_path, "usage", "--config", config, "--by", "key", "--json")
    assert by_key.returncode == 0, by_key.stderr
    rows = json.loads(by_key.stdout)
    assert [(r["client"], r["requests"], r["prompt_tokens"], r["cut"]) for r in rows] == [
        ("alice", 2, 5, 1),
        ("bob", 2, 4, 0),
    ]
    by_day = cli(tmp_path, "usage", "--config", config, "--by", "day", "--json")
    [today] = json.loads(by_day.stdout)
    assert today["day"] == time.strftime("%Y-%m-%d") and today["requests"] == 4
    assert today["cut"] == 1


async def test_serving_without_the_database_keeps_answering(
    start_proxy: ProxyFactory, upstream: RunningUpstream, tmp_path: Path
) -> None:
    """An unreachable database delays nothing: static keys work, /health says so."""
    from .conftest import free_port_block

    url = f"postgresql://nobody@127.0.0.1:{free_port_block(1)}/none"
    proxy = await start_proxy(
        [upstream.endpoint()], database_url=url, api_keys=["static-key-0123456789"]
    )
    client = proxy.client("static-key-0123456789")
    answer = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        await proxy.client(uuid.uuid4().hex).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}]
        )
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/health") as resp:
        stores = (await resp.json())["stores"]
    assert stores["keys"] == {"store": "postgresql", "reachable": False}


async def test_a_database_down_at_start_keeps_the_proxy_closed(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    """Whether keys exist is unknown until the database answers: every request needs
    one meanwhile, as with a deleted state directory."""
    from .conftest import free_port_block

    url = f"postgresql://nobody@127.0.0.1:{free_port_block(1)}/none"
    proxy = await start_proxy([upstream.endpoint()], database_url=url)
    with pytest.raises(openai.AuthenticationError):
        await proxy.client("anything").chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}]
        )


async def test_an_empty_shared_store_opens_once_read(
    start_proxy: ProxyFactory, upstream: RunningUpstream, database_url: str
) -> None:
    """A reachable database without keys is an open proxy, as an empty SQLite is."""
    proxy = await start_proxy([upstream.endpoint()], database_url=database_url)
    answer = await proxy.client("anything").chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content


async def test_usage_command_reads_the_fleets_records(
    start_proxy: ProxyFactory, upstream: RunningUpstream, tmp_path: Path, database_url: str
) -> None:
    """`!/usage` with database_url reads the shared database, where the records are (it
    read this host's SQLite, which has none then: "No requests today")."""
    client = f"usage-{uuid.uuid4().hex[:8]}"  # the session's database is shared by tests
    writer = PostgresUsageWriter(database_url, tmp_path / "spool.jsonl")
    writer.add([record(client, 2), record(client, 3), record("someone-else", 4)])
    await writer.flush()
    await writer.close()
    proxy = await start_proxy(
        [upstream.endpoint()],
        database_url=database_url,
        admin_key=ADMIN,
        state_dir=str(tmp_path / "st"),
    )
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as admin,
        admin.post(f"{proxy.url}/admin/keys", json={"name": client}) as resp,
    ):
        assert resp.status == 201
        secret = (await resp.json())["key"]
    sdk = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=secret, max_retries=0)

    async def answered() -> bool:  # the key reaches this host on its notice
        with contextlib.suppress(openai.AuthenticationError):
            done = await sdk.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "!/usage"}]
            )
            text = done.choices[0].message.content or ""
            assert "This key today: 2 requests, 5 prompt tokens" in text, text
            return True
        return False

    await until(answered)
    await sdk.close()
