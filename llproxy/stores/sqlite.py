"""The state database: API keys and usage records in SQLite, and how it is opened.

One file, `llproxy.db`, in the state directory. It is opened the same way by whoever
comes first (a `keys` command, the usage writer of a daemon), so it is private to its
owner whoever created it: the directory 0700, the file 0600. Usage records are written in
batches from a thread of their own, so no request waits on a disk write, and a graceful
stop writes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..core.keys import ApiKey, check_key_fields, key_hash, new_secret
from ..core.usage import UsageRecord

log = logging.getLogger("llproxy.usage")

DATABASE = "llproxy.db"


def state_dir(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """--state-dir, $LLPROXY_STATE_DIR, systemd's $STATE_DIRECTORY, else XDG state home."""
    env = os.environ if environ is None else environ
    for candidate in (explicit, env.get("LLPROXY_STATE_DIR")):
        if candidate:
            return Path(candidate)
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    home = Path(env.get("HOME") or Path.home())
    return Path(env.get("XDG_STATE_HOME") or home / ".local" / "state") / "llproxy"


def open_database(directory: Path, *schema: str, threads: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode with WAL (readers never wait on the writer), after
    creating the schema statements given. `threads` allows use from a worker thread."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / DATABASE
    path.touch(mode=0o600, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)  # also when an older llproxy made it with the umask's mode
    db = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=not threads)
    db.execute("PRAGMA journal_mode=WAL")
    for statement in schema:
        db.execute(statement)
    return db


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a file, None when it is missing: tells a file made anew at the
    same path from the one a connection has open."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


# --- keys ---------------------------------------------------------------------------

_KEYS_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    models TEXT NOT NULL,
    expires REAL,
    created REAL NOT NULL,
    revoked REAL,
    rate_limit TEXT,
    operator INTEGER NOT NULL DEFAULT 0
)
"""


class KeyStore:
    """The keys table of the state database."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / DATABASE
        self._db = open_database(directory, _KEYS_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(api_keys)")}
        if "operator" not in columns:  # made by an older llproxy: all its keys are clients'
            self._db.execute("ALTER TABLE api_keys ADD COLUMN operator INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def create(
        self,
        name: str,
        models: Iterable[str] = (),
        expires: float | None = None,
        rate_limit: str | None = None,
        operator: bool = False,
    ) -> str:
        """Store a new key and return its secret, which is never stored or shown again.
        KeyFieldError for a bad field, ValueError when the name is taken."""
        models = list(models)
        check_key_fields(name, models, expires)
        secret = new_secret()
        models_json = orjson.dumps(list(models)).decode()
        try:
            self._db.execute(
                "INSERT INTO api_keys "
                "(name, key_hash, models, expires, created, rate_limit, operator) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    key_hash(secret),
                    models_json,
                    expires,
                    time.time(),
                    rate_limit,
                    int(operator),
                ),
            )
        except sqlite3.IntegrityError:
            raise ValueError(f"a key named {name!r} exists already") from None
        return secret

    def revoke(self, name: str) -> str | None:
        """The revoked key's hash, or None when there is no active key of that name."""
        row = self._db.execute(
            "UPDATE api_keys SET revoked = ? WHERE name = ? AND revoked IS NULL RETURNING key_hash",
            (time.time(), name),
        ).fetchone()
        return None if row is None else str(row[0])

    def all(self) -> list[ApiKey]:
        rows = self._db.execute(
            "SELECT name, key_hash, models, expires, created, revoked, rate_limit, operator "
            "FROM api_keys ORDER BY name"
        ).fetchall()
        return [
            ApiKey(
                name,
                hashed,
                tuple(orjson.loads(models)),
                expires,
                created,
                revoked,
                limit,
                bool(operator),
            )
            for name, hashed, models, expires, created, revoked, limit, operator in rows
        ]

    def version(self) -> int:
        """Changes whenever another connection committed a write."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])


class StoredKeys:
    """The keys table as a running process follows it: read again when another process
    changed it, or when the database was made anew (the state directory deleted and
    recreated). While no database exists, the keys last read stay in force: deleting the
    state directory must not open the proxy."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.store: KeyStore | None = None
        self._file: tuple[int, int] | None = None
        self._version: int | None = None

    def changed(self) -> list[ApiKey] | None:
        """Every stored key when they changed since the last call; None when they did not."""
        path = self.directory / DATABASE
        if self.store is not None and self._file != file_identity(path) and path.exists():
            self.store.close()
            self.store, self._version = None, None
        if self.store is None:
            # The database may only appear when the first key is created.
            if not path.exists():
                return None
            self.store = KeyStore(self.directory)
            self._file = file_identity(path)
        version = self.store.version()
        if version == self._version:
            return None
        self._version = version
        return self.store.all()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


# --- usage ---------------------------------------------------------------------------

FLUSH_SECONDS = 1.0

_USAGE_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS usage (
    time REAL NOT NULL,
    client TEXT NOT NULL,
    model TEXT NOT NULL,
    upstream TEXT,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    duration_ms REAL NOT NULL,
    dialect TEXT NOT NULL DEFAULT 'openai',
    cut TEXT
)
""",
    "CREATE INDEX IF NOT EXISTS usage_time ON usage (time)",
)
_USAGE_COLUMNS = (
    "time, client, model, upstream, status, prompt_tokens, completion_tokens, duration_ms, dialect,"
    " cut"
)


def _open_usage(directory: Path, threads: bool = False) -> sqlite3.Connection:
    """The database with its usage table as this version writes it: one made by an older
    llproxy gets the `dialect` column (its records were all OpenAI's) and `cut` (none was).
    """
    db = open_database(directory, *_USAGE_SCHEMA, threads=threads)
    columns = {row[1] for row in db.execute("PRAGMA table_info(usage)")}
    if "dialect" not in columns:
        db.execute("ALTER TABLE usage ADD COLUMN dialect TEXT NOT NULL DEFAULT 'openai'")
    if "cut" not in columns:
        db.execute("ALTER TABLE usage ADD COLUMN cut TEXT")
    return db


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
    spooled: int = 0  # waiting in a local spool for a shared database to come back


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
        self.reachable: bool | None = None
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
            self.reachable = False
            log.error("cannot write %d usage records (kept for the next try): %s", len(batch), exc)
            self._pending[:0] = batch
            self.add(())  # holds the bound
        else:
            self.telemetry.written += len(batch)
            self.reachable = True

    def _write(self, batch: list[UsageRecord]) -> None:
        path = self.directory / DATABASE
        if self._db is not None and self._file != file_identity(path):
            # Deleted or replaced under us: writing on would lose every record unseen.
            log.error("the usage database %s was removed while in use; making it anew", path)
            self.telemetry.recreated += 1
            self._close_database()
        if self._db is None:
            self._db = _open_usage(self.directory, threads=True)
            self._file = file_identity(path)
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                f"INSERT INTO usage ({_USAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch
            )

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
    "dialect": ("dialect", "dialect"),
}


def usage_sums(
    directory: Path, since: float | None, by: str, client: str | None = None
) -> list[dict[str, Any]]:
    """Requests, token sums and answers cut per group (of one client's records, given
    one); a sum is null when no record of it had numbers."""
    name, expression = GROUPINGS[by]
    path = directory / DATABASE
    if not path.exists():
        return []
    db = _open_usage(directory)
    try:
        rows = db.execute(
            f"SELECT {expression}, count(*), sum(prompt_tokens), sum(completion_tokens), "
            "count(cut) FROM usage WHERE time >= ? AND (? IS NULL OR client = ?) "
            "GROUP BY 1 ORDER BY 1",
            (since or 0.0, client, client),
        ).fetchall()
    finally:
        db.close()
    return [sums_row(name, *row) for row in rows]


def sums_row(
    name: str, group: Any, count: int, prompt: int | None, completion: int | None, cut: int
) -> dict[str, Any]:
    """One group's sums as usage_sums gives them (here and in the shared database):
    `cut` counts the answers llproxy cut short (a loop, core/mend)."""
    return {
        name: group,
        "requests": count,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cut": cut,
    }
