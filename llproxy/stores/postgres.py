"""Keys and usage records in PostgreSQL, shared by every llproxy host of a fleet.

llproxy makes and migrates its own schema (versioned migrations under an advisory lock, so
hosts starting together wait for one another). A trigger notifies every listener when a
key changes: each serving process keeps the keys in memory and reads them again on that
notice, so no request waits on the database. Usage records are written in batches by one
writer per host; while the database cannot be reached they go to a bounded spool file and
are written, each exactly once (every record carries an id), when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from ..core.keys import ApiKey, KeyRing, check_key_fields, key_hash, new_secret
from ..core.usage import UsageRecord
from .sqlite import FLUSH_SECONDS, GROUPINGS, MAX_PENDING, WriterTelemetry, sums_row

log = logging.getLogger("llproxy.stores")

CONNECT_TIMEOUT = 5.0
QUERY_TIMEOUT = 10.0
RETRY_SECONDS = 1.0
# Keys are read again this often even without a notice: a connection that died silently
# is found out, and a missed notice costs at most this long.
RELOAD_SECONDS = 5.0
NOTICE_CHANNEL = "llproxy_keys"
# pg_advisory_xact_lock's key for migrations ("llproxy" in ASCII).
MIGRATION_LOCK = 0x6C6C70726F7879
SPOOL_FILE = "usage-spool.jsonl"
SPOOL_BYTES = 64 * 1024 * 1024  # about 300,000 records
DRAIN_CHUNK = 5000

# What a lost, refused or failing database raises.
DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

# Each entry is one version of the schema; never edit one that shipped, add the next.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE api_keys (
        name text PRIMARY KEY,
        key_hash text NOT NULL UNIQUE,
        models text NOT NULL,
        expires double precision,
        created double precision NOT NULL,
        revoked double precision,
        rate_limit text,
        operator boolean NOT NULL DEFAULT false
    );
    CREATE TABLE usage (
        id uuid PRIMARY KEY,
        time double precision NOT NULL,
        client text NOT NULL,
        model text NOT NULL,
        upstream text,
        status integer NOT NULL,
        prompt_tokens bigint,
        completion_tokens bigint,
        duration_ms double precision NOT NULL,
        dialect text NOT NULL
    );
    CREATE INDEX usage_time ON usage (time);
    CREATE FUNCTION llproxy_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('llproxy_keys', '');
        RETURN NULL;
    END $$;
    CREATE TRIGGER api_keys_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
        ON api_keys FOR EACH STATEMENT EXECUTE FUNCTION llproxy_keys_changed();
    """,
    # Why llproxy cut an answer short ("loop"; core/mend).
    "ALTER TABLE usage ADD COLUMN cut text",
)
SCHEMA_VERSION = len(MIGRATIONS)


async def connect(url: str) -> Any:
    """One connection, bounded in time (asyncpg has no types: an asyncpg.Connection)."""
    return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT, command_timeout=QUERY_TIMEOUT)


async def schema_version(conn: Any) -> int:
    if not await conn.fetchval("SELECT to_regclass('llproxy_schema') IS NOT NULL"):
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM llproxy_schema"))


async def upgrade(conn: Any) -> tuple[int, int]:
    """Apply the migrations this database lacks; (version found, version now). Hosts
    doing it at once queue on an advisory lock, and each looks again once it holds it."""
    found = await schema_version(conn)
    if found >= SCHEMA_VERSION:
        if found > SCHEMA_VERSION:
            log.warning(
                "the database's schema (version %d) is newer than this llproxy's (%d)",
                found,
                SCHEMA_VERSION,
            )
        return found, found
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS llproxy_schema "
            "(version integer PRIMARY KEY, applied double precision NOT NULL)"
        )
        found = await schema_version(conn)
        for version in range(found + 1, SCHEMA_VERSION + 1):
            await conn.execute(MIGRATIONS[version - 1])
            await conn.execute("INSERT INTO llproxy_schema VALUES ($1, $2)", version, time.time())
    if found < SCHEMA_VERSION:
        log.info("database schema upgraded from version %d to %d", found, SCHEMA_VERSION)
    return found, max(found, SCHEMA_VERSION)


@contextlib.asynccontextmanager
async def session(url: str) -> Any:
    """A connection to a database whose schema is current, closed after use."""
    conn = await connect(url)
    try:
        await upgrade(conn)
        yield conn
    finally:
        await conn.close(timeout=CONNECT_TIMEOUT)


# --- keys ---------------------------------------------------------------------------

_KEY_COLUMNS = "name, key_hash, models, expires, created, revoked, rate_limit, operator"


async def load_keys(conn: Any) -> list[ApiKey]:
    rows = await conn.fetch(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY name")
    return [
        ApiKey(
            row["name"],
            row["key_hash"],
            tuple(orjson.loads(row["models"])),
            row["expires"],
            row["created"],
            row["revoked"],
            row["rate_limit"],
            row["operator"],
        )
        for row in rows
    ]


async def create_key(
    url: str,
    name: str,
    models: Iterable[str] = (),
    expires: float | None = None,
    rate_limit: str | None = None,
    operator: bool = False,
) -> str:
    """As KeyStore.create, in the shared database: every host hears of it at once."""
    models = list(models)
    check_key_fields(name, models, expires)
    secret = new_secret()
    async with session(url) as conn:
        try:
            await conn.execute(
                f"INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, NULL, $6, $7)",
                name,
                key_hash(secret),
                orjson.dumps(models).decode(),
                expires,
                time.time(),
                rate_limit,
                operator,
            )
        except asyncpg.UniqueViolationError:
            raise ValueError(f"a key named {name!r} exists already") from None
    return secret


async def revoke_key(url: str, name: str) -> str | None:
    """The revoked key's hash, or None when there is no active key of that name."""
    async with session(url) as conn:
        hashed = await conn.fetchval(
            "UPDATE api_keys SET revoked = $1 WHERE name = $2 AND revoked IS NULL "
            "RETURNING key_hash",
            time.time(),
            name,
        )
    return None if hashed is None else str(hashed)


async def all_keys(url: str) -> list[ApiKey]:
    async with session(url) as conn:
        return await load_keys(conn)


class PostgresKeySync:
    """Keeps a KeyRing equal to the shared keys table: read at start, again on each
    notice of a change (LISTEN), and every RELOAD_SECONDS. While the database cannot be
    reached the keys last read stay in force; `reachable` says which it is."""

    store = "postgresql"

    def __init__(self, ring: KeyRing, url: str) -> None:
        self.ring = ring
        self.ring.awaiting_store = True  # closed until the keys were read once
        self.url = url
        self.reachable: bool | None = None  # None: not tried yet
        self._wake = asyncio.Event()
        self._tried = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def refresh_stored(self) -> None:
        """Read the keys again soon (this process changed them)."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llproxy-keys")

    async def loaded(self, timeout: float) -> bool:
        """Wait (bounded) until the keys were read once, or the first try failed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tried.wait(), timeout)
        return self.reachable is True

    async def _run(self) -> None:
        while True:
            try:
                await self._follow()
            except DATABASE_ERRORS as exc:
                if self.reachable is not False:
                    log.warning(
                        "cannot reach the key database (%s): the keys read last stay in force",
                        exc or type(exc).__name__,
                    )
                self.reachable = False
                self._tried.set()
            await asyncio.sleep(RETRY_SECONDS)

    async def _follow(self) -> None:
        conn = await connect(self.url)
        try:
            await upgrade(conn)
            await conn.add_listener(NOTICE_CHANNEL, lambda *_: self._wake.set())
            conn.add_termination_listener(lambda *_: self._wake.set())
            while True:
                self._wake.clear()
                self.ring.replace(await load_keys(conn))
                self.ring.awaiting_store = False
                if self.reachable is False:
                    log.warning("the key database is reachable again")
                self.reachable = True
                self._tried.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), RELOAD_SECONDS)
                if conn.is_closed():
                    raise ConnectionError("the connection to the key database closed")
        finally:
            conn.terminate()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# --- usage ---------------------------------------------------------------------------

Row = tuple[Any, ...]  # a record with its id first


# A batch in one statement, one array a column; a record already written is skipped.
_INSERT = (
    "INSERT INTO usage (id, time, client, model, upstream, status, prompt_tokens, "
    "completion_tokens, duration_ms, dialect, cut) SELECT * FROM unnest($1::uuid[], "
    "$2::float8[], $3::text[], $4::text[], $5::text[], $6::int4[], $7::int8[], $8::int8[], "
    "$9::float8[], $10::text[], $11::text[]) ON CONFLICT (id) DO NOTHING"
)


class PostgresUsageWriter:
    """Batches records and writes them to the shared database every FLUSH_SECONDS.

    While the database cannot be written, batches are appended to a spool file (bounded
    by `max_spool` bytes; past it new records are dropped and counted); once a write
    succeeds again the spool is written first, in order, and emptied. A record's id makes
    a write whose outcome was lost harmless to repeat. A spool left by an earlier run is
    written at the next start.
    """

    def __init__(self, url: str, spool: Path, max_spool: int = SPOOL_BYTES) -> None:
        self.url = url
        self.spool = spool
        self.max_spool = max_spool
        self.telemetry = WriterTelemetry()
        self.reachable: bool | None = None
        self._pending: list[UsageRecord] = []
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.telemetry.spooled = self._count_spooled()

    def _count_spooled(self) -> int:
        found = 0
        for path in [self.spool, *self.spool.parent.glob(f"{self.spool.name}.*.drain")]:
            with contextlib.suppress(FileNotFoundError), path.open("rb") as file:
                found += sum(1 for _ in file)
        return found

    def add(self, records: Sequence[UsageRecord]) -> None:
        self._pending.extend(records)
        excess = len(self._pending) - MAX_PENDING
        if excess > 0:
            del self._pending[:excess]
            self.telemetry.dropped += excess

    def start(self, collect: Callable[[], Sequence[UsageRecord]] | None = None) -> None:
        """Flush every FLUSH_SECONDS, first adding what `collect` returns, if given."""
        self._task = asyncio.create_task(self._run(collect), name="llproxy-usage")

    async def _run(self, collect: Callable[[], Sequence[UsageRecord]] | None) -> None:
        # Not cancelled by close(): a write under way finishes (bounded by QUERY_TIMEOUT).
        await self._drain()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), FLUSH_SECONDS)
            if collect is not None:
                self.add(collect())
            await self.flush()  # the last one after a stop, too
            if self._stop.is_set():
                return

    async def flush(self) -> None:
        rows: list[Row] = [(uuid.uuid4(), *record) for record in self._pending]
        self._pending = []
        if self._conn is not None and not self.telemetry.spooled:
            if not rows:
                return
            try:
                await self._conn.execute(_INSERT, *zip(*rows, strict=True))
            except DATABASE_ERRORS as exc:
                self._lost(exc)
            else:
                self.telemetry.written += len(rows)
                return
        # Unreachable, or records wait in the spool: these go after them, in order.
        self._to_spool(rows)
        await self._drain()

    def _lost(self, exc: BaseException) -> None:
        self.telemetry.write_errors += 1
        if self.reachable is not False:
            log.warning(
                "cannot write usage records to the database (%s): spooling them to %s "
                "until it is back",
                exc or type(exc).__name__,
                self.spool,
            )
        self.reachable = False
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    def _to_spool(self, rows: list[Row]) -> None:
        if not rows:
            return
        data = b"".join(orjson.dumps([row[0].hex, *row[1:]]) + b"\n" for row in rows)
        try:
            size = self.spool.stat().st_size
        except FileNotFoundError:
            size = 0
        if size + len(data) > self.max_spool:
            self.telemetry.dropped += len(rows)
            log.error(
                "dropped %d usage records: the spool %s is full (%d bytes)",
                len(rows),
                self.spool,
                self.max_spool,
            )
            return
        self.spool.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = self._locked_spool(os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)  # and its lock
        self.telemetry.spooled += len(rows)

    def _locked_spool(self, flags: int) -> int:
        """The spool file open and locked (for microseconds: one write, or a rename), and
        still the one at its path: another llproxy on the same state directory may
        have taken it away to drain it meanwhile. FileNotFoundError without O_CREAT."""
        while True:
            fd = os.open(self.spool, flags, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(self.spool).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _take_spool(self) -> list[Path]:
        """The spool renamed away for draining (so records spooled meanwhile start a new
        one), with any earlier drain's file that was cut short."""
        try:
            fd = self._locked_spool(os.O_RDONLY)
        except FileNotFoundError:
            pass
        else:
            try:
                taken = f"{self.spool.name}.{uuid.uuid4().hex}.drain"
                os.rename(self.spool, self.spool.with_name(taken))
            finally:
                os.close(fd)
        return sorted(self.spool.parent.glob(f"{self.spool.name}.*.drain"))

    async def _drain(self) -> None:
        """Connect if need be, then write the spool and empty it."""
        try:
            if self._conn is None:
                self._conn = await connect(self.url)
                await upgrade(self._conn)
            if self.telemetry.spooled:
                # Chunk by chunk; a drain cut short starts again from the top, and the
                # chunks already in are skipped by their ids.
                drained = 0
                for taken in self._take_spool():
                    for chunk in self._read_spool(taken):
                        await self._conn.execute(_INSERT, *zip(*chunk, strict=True))
                        drained += len(chunk)
                    taken.unlink(missing_ok=True)
                self.telemetry.written += drained
                self.telemetry.spooled = 0
                log.warning("wrote %d spooled usage records to the database", drained)
        except DATABASE_ERRORS as exc:
            self._lost(exc)
            return
        if self.reachable is False:
            log.warning("the usage database is reachable again")
        self.reachable = True

    def _read_spool(self, path: Path) -> Iterator[list[Row]]:
        """The spooled records, DRAIN_CHUNK at a time."""
        rows: list[Row] = []
        try:
            with path.open("rb") as file:
                for line in file:
                    try:
                        first, *rest = orjson.loads(line)
                        rows.append((uuid.UUID(hex=first), *UsageRecord(*rest)))
                    except (orjson.JSONDecodeError, TypeError, ValueError):
                        # A line cut short by a crash mid-write: nothing to recover.
                        self.telemetry.dropped += 1
                    if len(rows) == DRAIN_CHUNK:
                        yield rows
                        rows = []
        except FileNotFoundError:
            pass
        if rows:
            yield rows

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        else:
            await self.flush()
        if self._conn is not None:
            await self._conn.close(timeout=CONNECT_TIMEOUT)
            self._conn = None


def _day_rows(buckets: list[Any]) -> list[dict[str, Any]]:
    """Quarter-hour buckets (UTC) summed into local days: every time zone's offset is a
    whole number of quarter hours, so each bucket falls into one local day."""
    days: dict[str, list[Any]] = {}
    for bucket, count, prompt, completion, cut in buckets:
        day = datetime.datetime.fromtimestamp(bucket * 900).date().isoformat()
        sums = days.setdefault(day, [0, None, None, 0])
        sums[0] += count
        if prompt is not None:
            sums[1] = (sums[1] or 0) + prompt
        if completion is not None:
            sums[2] = (sums[2] or 0) + completion
        sums[3] += cut
    return [sums_row("day", day, *sums) for day, sums in sorted(days.items())]


async def usage_sums(
    url: str, since: float | None, by: str, client: str | None = None
) -> list[dict[str, Any]]:
    """As sqlite.usage_sums, over every host's records."""
    name, expression = GROUPINGS[by]
    if by == "day":
        expression = "floor(time / 900)::bigint"
    async with session(url) as conn:
        rows = await conn.fetch(
            f"SELECT {expression}, count(*), sum(prompt_tokens)::bigint, "
            "sum(completion_tokens)::bigint, count(cut) "
            "FROM usage WHERE time >= $1 AND ($2::text IS NULL OR client = $2) "
            "GROUP BY 1 ORDER BY 1",
            since or 0.0,
            client,
        )
    found = [tuple(row) for row in rows]
    if by == "day":
        return _day_rows(found)
    return [sums_row(name, *row) for row in found]
