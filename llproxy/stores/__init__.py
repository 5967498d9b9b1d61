"""Where shared state lives: API keys, usage records, rate-limit counts.

Each is a small protocol with implementations in SQLite (keys, usage), PostgreSQL (keys
and usage shared by a fleet of hosts), shared memory (one host's rate counts) and Redis
(rate counts and revocations shared by several hosts). One function, `build_services`,
chooses them from the config; a single process, a worker and the tests all get theirs
from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import multiprocessing
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..config import Config
from ..core.desk import DeskPort, HeldDesk
from ..core.keys import ApiKey, KeyRing
from ..core.ratelimit import Verdict
from ..core.usage import UsageRecord
from ..telemetry.desk import DeskTelemetry
from .memory import TABLE_BYTES, DequeWindows, HostCounter, ProcessLock, WindowTable
from .sqlite import (
    FLUSH_SECONDS,
    KeyStore,
    StoredKeys,
    UsageWriter,
    WriterTelemetry,
    state_dir,
    usage_sums,
)

# PostgreSQL (asyncpg) and Redis (redis-py) are imported where `database_url` or
# `redis_url` asks for them: redis-py costs a worker about 10 MB and asyncpg 5 MB that a
# host without them would hold for nothing (scripts/rss.py measures it).
if TYPE_CHECKING:
    from .postgres import PostgresUsageWriter
    from .redis import Revocations

log = logging.getLogger("llproxy.stores")

KEY_REFRESH_SECONDS = 2.0
# How long a serving process waits at start for the shared keys before it serves with
# the keys of its config alone (and takes the shared ones as soon as they come).
KEYS_WAIT = 5.0
PROBE_SECONDS = 2.0


class RateCounter(Protocol):
    async def hit(self, limit: str, client: str) -> Verdict:
        """Check and count one request of `client` against `limit`, in one step."""
        ...

    async def probe(self) -> bool:
        """Whether the counts can be reached now (bounded in time)."""
        ...

    async def close(self) -> None: ...


class UsageSink(Protocol):
    @property
    def telemetry(self) -> WriterTelemetry | None:
        """What became of the records, where they are written (None: passed on)."""

    @property
    def reachable(self) -> bool | None:
        """Whether the last write went through (None: none yet, or passed on)."""

    def add(self, records: Sequence[UsageRecord]) -> None: ...

    def start(self) -> None: ...

    async def close(self) -> None:
        """Write (or pass on) what is left."""
        ...


@dataclass(frozen=True)
class HostShare:
    """Memory and a lock shared by one host's processes (the rate table): made by the
    master before its workers exist, handed to each at spawn."""

    memory: Any
    lock: ProcessLock

    @classmethod
    def create(cls, context: Any = None) -> HostShare:
        context = context or multiprocessing.get_context("spawn")
        return cls(context.RawArray("B", TABLE_BYTES), context.Lock())

    @classmethod
    def private(cls) -> HostShare:
        """For a process that serves alone (its pages are mapped as they are used)."""
        return cls(mmap.mmap(-1, TABLE_BYTES), threading.Lock())


class ForwardedUsage:
    """A worker's usage sink: records go to whoever writes them (the master), in batches."""

    telemetry: WriterTelemetry | None = None
    reachable: bool | None = None

    def __init__(self, send: Callable[[list[UsageRecord]], Any]) -> None:
        self.send = send
        self.pending: list[UsageRecord] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, records: Sequence[UsageRecord]) -> None:
        self.pending.extend(records)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llproxy-usage-forward")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            records, self.pending = self.pending, []
            self.send(records)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._flush()


class KeyFollower(Protocol):
    """What keeps a KeyRing current with the stored keys."""

    store: str  # where they are: "sqlite", "postgresql"
    reachable: bool | None  # at the last try (None: not tried yet)

    def refresh_stored(self) -> None:
        """Take this process's own change now (or as soon as can be)."""

    def start(self) -> None: ...

    async def loaded(self, timeout: float) -> bool:
        """Wait, at most `timeout`, until the stored keys were read once."""
        ...

    async def close(self) -> None: ...


class KeySync:
    """Keeps a KeyRing current: the stored keys when they change, and the keys revoked on
    other instances (Redis), read again every KEY_REFRESH_SECONDS."""

    store = "sqlite"

    def __init__(self, ring: KeyRing, stored: StoredKeys, revocations: Revocations | None):
        self.ring = ring
        self.stored = stored
        self.revocations = revocations
        self.reachable: bool | None = None
        self._task: asyncio.Task[None] | None = None
        self._errors: tuple[type[Exception], ...] = (sqlite3.Error, OSError)
        if revocations is not None:
            from redis.exceptions import RedisError  # imported with the revocations

            self._errors = (*self._errors, RedisError)

    def refresh_stored(self) -> None:
        changed = self.stored.changed()
        if changed is not None:
            self.ring.replace(changed)

    async def refresh(self) -> None:
        self.refresh_stored()
        if self.revocations is not None:
            self.ring.revoked_elsewhere = await self.revocations.all()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llproxy-keys")

    async def loaded(self, timeout: float) -> bool:
        return True  # read in refresh_stored, before serving

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except self._errors as exc:
                log.warning("cannot reload API keys: %s", exc)
                self.reachable = not isinstance(exc, sqlite3.Error)
            else:
                self.reachable = True
            await asyncio.sleep(KEY_REFRESH_SECONDS)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.revocations is not None:
            await self.revocations.close()
        self.stored.close()


@dataclass
class Services:
    """The stores one serving process uses, chosen from the config."""

    keys: KeyRing
    key_sync: KeyFollower
    usage: UsageSink
    rate: RateCounter  # asked only for a client that a limit applies to
    desk: DeskPort  # the operators' queue: held here, or reached over a channel
    usage_store: str = "sqlite"
    desk_store: str = "this host"
    rate_store: str = "memory"
    rate_reachable: bool | None = None
    _probe: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.key_sync.refresh_stored()
        self.key_sync.start()
        self.usage.start()
        self.desk.start()
        self._probe = asyncio.create_task(self._probe_rate(), name="llproxy-store-probe")
        if not await self.key_sync.loaded(KEYS_WAIT):
            log.warning(
                "serving without the shared keys (not read within %g s): they apply as "
                "soon as the database answers",
                KEYS_WAIT,
            )

    async def _probe_rate(self) -> None:
        while True:
            self.rate_reachable = await self.rate.probe()
            await asyncio.sleep(PROBE_SECONDS)

    def health(self) -> dict[str, dict[str, Any]]:
        """Which store holds what, and whether each answered at its last use or probe
        (never waits: /health must answer while a store hangs)."""
        keys = self.key_sync.reachable
        return {
            "keys": {"store": self.key_sync.store, "reachable": keys},
            # A worker's records go to its master, which writes them to the same
            # database the keys come from: that database's state stands for both.
            "usage": {
                "store": self.usage_store,
                "reachable": keys if self.usage.telemetry is None else self.usage.reachable,
            },
            "rate": {
                "store": self.rate_store,
                "reachable": self.rate_reachable,
            },
            # A fleet's desk travels through the same Redis as the rate counts.
            "desk": {
                "store": self.desk_store,
                "reachable": self.rate_reachable if self.desk_store == "redis" else True,
            },
        }

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.desk.close()
        await self.key_sync.close()
        await self.usage.close()
        await self.rate.close()


Overflow = Callable[[str, str], Awaitable[Verdict]]


def build_services(
    config: Config,
    host: HostShare | None = None,
    forward_usage: Callable[[list[UsageRecord]], Any] | None = None,
    overflow: Overflow | None = None,
    desk: DeskPort | None = None,
) -> Services:
    """The stores of one serving process. A worker passes what its master shares: the
    host's rate table, where its usage records go, who counts what the table cannot, the
    operators' desk; a process serving alone passes nothing and holds all of them."""
    directory = state_dir(config.state_dir)
    keys = KeyRing(config.api_keys)
    key_sync: KeyFollower
    if config.database_url is not None:
        from .postgres import PostgresKeySync

        key_sync = PostgresKeySync(keys, config.database_url)
    else:
        revocations = None
        if config.redis_url:
            from .redis import Revocations

            revocations = Revocations(config.redis_url)
        key_sync = KeySync(keys, StoredKeys(directory), revocations)
    usage: UsageSink = (
        ForwardedUsage(forward_usage) if forward_usage is not None else usage_writer(config)
    )
    rate: RateCounter
    if config.redis_url is not None:
        from .redis import RedisCounter

        rate = RedisCounter(config.redis_url)
    else:
        share = host or HostShare.private()
        rate = HostCounter(WindowTable(share.memory, share.lock), overflow or DequeWindows().hit)
    return Services(
        keys,
        key_sync,
        usage,
        rate,
        desk or HeldDesk(observer=DeskTelemetry()),
        usage_store="postgresql" if config.database_url is not None else "sqlite",
        # With redis_url the desk is the fleet's (held by one host, reached through it).
        desk_store="redis" if config.redis_url is not None else "this host",
        rate_store="redis" if config.redis_url is not None else "memory",
    )


def describe_stores(config: Config) -> str:
    """Where a serving llproxy keeps what, in words for its log."""
    if config.database_url is not None:
        records = "keys and usage in PostgreSQL (shared)"
    else:
        records = f"keys and usage in SQLite ({state_dir(config.state_dir)})"
    counts = "Redis (shared)" if config.redis_url is not None else "this host's memory"
    desk = "shared through Redis" if config.redis_url is not None else "on this host"
    return f"{records}, rate counts in {counts}, operators' desk {desk}"


def database_errors(config: Config) -> tuple[type[Exception], ...]:
    """What a lost, refused or failing key and usage database raises: with database_url,
    stores/postgres.py's DATABASE_ERRORS; without it asyncpg's cannot happen (nor is it
    imported), and these remain."""
    if config.database_url is None:
        return (OSError, TimeoutError)
    from .postgres import DATABASE_ERRORS

    return DATABASE_ERRORS


def usage_writer(config: Config) -> UsageWriter | PostgresUsageWriter:
    """Who writes a host's usage records: the shared database (spooling to the state
    directory while it cannot be reached), else the host's SQLite."""
    directory = state_dir(config.state_dir)
    if config.database_url is not None:
        from .postgres import SPOOL_FILE, PostgresUsageWriter

        return PostgresUsageWriter(config.database_url, directory / SPOOL_FILE)
    return UsageWriter(directory)


async def create_key(
    config: Config,
    name: str,
    models: Sequence[str] = (),
    expires: float | None = None,
    rate_limit: str | None = None,
    operator: bool = False,
) -> str:
    """Store a new key; its secret, shown once. KeyFieldError for a bad field, ValueError
    when the name is taken; with database_url, the database's errors (DATABASE_ERRORS)."""
    if config.database_url is not None:
        from .postgres import create_key as create_shared_key

        return await create_shared_key(
            config.database_url, name, models, expires, rate_limit, operator
        )
    with KeyStore(state_dir(config.state_dir)) as store:
        return store.create(name, models, expires, rate_limit, operator)


async def revoke_key(config: Config, name: str) -> bool:
    """Revoke a key here and, with redis_url, on every instance sharing that Redis; False
    when there is no active key of that name. RedisError when it could not be shared.
    With database_url, in the shared database: every instance hears of it at once."""
    if config.database_url is not None:
        from .postgres import revoke_key as revoke_shared_key

        return await revoke_shared_key(config.database_url, name) is not None
    with KeyStore(state_dir(config.state_dir)) as store:
        hashed = store.revoke(name)
    if hashed is None:
        return False
    if config.redis_url is not None:
        from .redis import Revocations

        revocations = Revocations(config.redis_url)
        try:
            await revocations.share(hashed)
        finally:
            await revocations.close()
    return True


async def list_keys(config: Config) -> list[ApiKey]:
    """Every stored key, in the shared database or this host's."""
    if config.database_url is not None:
        from .postgres import all_keys

        return await all_keys(config.database_url)
    with KeyStore(state_dir(config.state_dir)) as store:
        return store.all()


async def usage_totals(
    config: Config, since: float | None, by: str, client: str | None = None
) -> list[dict[str, Any]]:
    """Requests and tokens per group (sqlite.GROUPINGS), of one client's records when
    given one: the whole fleet's with database_url, else this host's."""
    if config.database_url is not None:
        from .postgres import usage_sums as shared_usage_sums

        return await shared_usage_sums(config.database_url, since, by, client)
    return await asyncio.to_thread(usage_sums, state_dir(config.state_dir), since, by, client)
