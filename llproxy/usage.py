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
from pathlib import Path
from typing import Any, NamedTuple

from .statedb import DATABASE, open_database

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


class UsageWriter:
    """Batches records and writes them off the event loop, in one thread of its own.

    Every use of the database happens in that thread, one after another: a flush cancelled
    by a stop leaves its batch being written there, and the final flush and the close queue
    up behind it instead of using the connection alongside it (which SQLite does not
    survive).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._pending: list[UsageRecord] = []
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llproxy-usage")
        self._task: asyncio.Task[None] | None = None

    def add(self, records: Sequence[UsageRecord]) -> None:
        self._pending.extend(records)

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
            log.error("cannot write %d usage records (kept for the next try): %s", len(batch), exc)
            self._pending[:0] = batch

    def _write(self, batch: list[UsageRecord]) -> None:
        if self._db is None:
            self._db = open_database(self.directory, *_SCHEMA, threads=True)
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)", batch)

    def _close_database(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

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
