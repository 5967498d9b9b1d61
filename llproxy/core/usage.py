"""Usage accounting: one record per proxied request, written to SQLite in batches.

A request only appends a tuple to a list; a writer flushes the list from a thread every
second, so no request waits on a disk write, and `close()` writes what is left, so a
graceful stop loses nothing. Token counts are the upstream's `usage` or null: llproxy
never invents numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ..stores.sqlite import DATABASE, file_identity, open_database

log = logging.getLogger("llproxy.usage")

FLUSH_SECONDS = 1.0

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS usage (
    time REAL NOT NULL,
    client TEXT NOT NULL,
    model TEXT NOT NULL,
    upstream TEXT,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    duration_ms REAL NOT NULL
)
""",
    "CREATE INDEX IF NOT EXISTS usage_time ON usage (time)",
)


class UsageRecord(NamedTuple):
    """One proxied request. A tuple, so a batch pickles to a worker's channel cheaply
    (a slotted dataclass pickles through `dataclasses.fields`, which showed in profiles)
    and goes to SQLite as it is."""

    time: float
    client: str  # the API key's name, else the client's address
    model: str
    upstream: str | None
    status: int
    prompt_tokens: int | None
    completion_tokens: int | None
    duration_ms: float


# Records held while the database cannot be written; past this the oldest are dropped
# (and counted), so an unwritable state directory cannot exhaust memory.
MAX_PENDING = 1_000_000


@dataclass(slots=True)
class WriterTelemetry:
    """What became of the usage records: written, or lost (and why it is never silent)."""

    written: int = 0
    dropped: int = 0
    write_errors: int = 0
    recreated: int = 0  # times the database file vanished and was made anew


class UsageWriter:
    """Batches records and writes them off the event loop, in one thread of its own.

    Every use of the database happens in that thread, one after another: a flush cancelled
    by a stop leaves its batch being written there, and the final flush and the close queue
    up behind it instead of using the connection alongside it (which SQLite does not
    survive). Before each batch it checks that its file is still the one at the path: a
    deleted state directory would otherwise swallow every record into an unlinked file.
    """

    def __init__(self, directory: Path, max_pending: int = MAX_PENDING) -> None:
        self.directory = directory
        self.max_pending = max_pending
        self.telemetry = WriterTelemetry()
        self._pending: list[UsageRecord] = []
        self._db: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None  # (device, inode) of the open database
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llproxy-usage")
        self._task: asyncio.Task[None] | None = None

    def add(self, records: Sequence[UsageRecord]) -> None:
        self._pending.extend(records)
        excess = len(self._pending) - self.max_pending
        if excess > 0:
            del self._pending[:excess]
            self.telemetry.dropped += excess
            log.error(
                "dropped the %d oldest usage records: %d wait for a writable database",
                excess,
                self.max_pending,
            )

    def start(self, collect: Callable[[], Sequence[UsageRecord]] | None = None) -> None:
        """Flush every FLUSH_SECONDS, first adding what `collect` returns, if given."""
        self._task = asyncio.create_task(self._run(collect), name="llproxy-usage")

    async def _run(self, collect: Callable[[], Sequence[UsageRecord]] | None) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            if collect is not None:
                self.add(collect())
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        written = asyncio.get_running_loop().run_in_executor(self._thread, self._write, batch)
        try:
            # Shielded: once handed to the thread, a batch is written whatever happens here.
            await asyncio.shield(written)
        except (sqlite3.Error, OSError) as exc:  # also: the state directory is unusable
            self.telemetry.write_errors += 1
            log.error("cannot write %d usage records (kept for the next try): %s", len(batch), exc)
            self._pending[:0] = batch
            self.add(())  # holds the bound
        else:
            self.telemetry.written += len(batch)

    def _write(self, batch: list[UsageRecord]) -> None:
        path = self.directory / DATABASE
        if self._db is not None and self._file != file_identity(path):
            # Deleted or replaced under us: writing on would lose every record unseen.
            log.error("the usage database %s was removed while in use; making it anew", path)
            self.telemetry.recreated += 1
            self._close_database()
        if self._db is None:
            self._db = open_database(self.directory, *_SCHEMA, threads=True)
            self._file = file_identity(path)
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)", batch)

    def _close_database(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
            self._file = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._close_database)
        self._thread.shutdown()


GROUPINGS = {
    "key": ("client", "client"),
    "model": ("model", "model"),
    "day": ("day", "date(time, 'unixepoch', 'localtime')"),
}


def usage_sums(directory: Path, since: float | None, by: str) -> list[dict[str, Any]]:
    """Requests and token sums per group; a sum is null when no record of it had numbers."""
    name, expression = GROUPINGS[by]
    path = directory / DATABASE
    if not path.exists():
        return []
    db = open_database(directory, *_SCHEMA)
    try:
        rows = db.execute(
            f"SELECT {expression}, count(*), sum(prompt_tokens), sum(completion_tokens) "
            "FROM usage WHERE time >= ? GROUP BY 1 ORDER BY 1",
            (since or 0.0,),
        ).fetchall()
    finally:
        db.close()
    return [
        {name: group, "requests": count, "prompt_tokens": prompt, "completion_tokens": completion}
        for group, count, prompt, completion in rows
    ]
