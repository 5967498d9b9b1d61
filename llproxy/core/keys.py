"""Client API keys: random secrets shown once, stored only as SHA-256 hashes in SQLite.

SHA-256 rather than a slow password hash: keys are 256 random bits, so nothing is gained
by slowing the hash, and a slow hash would make every request a denial-of-service lever.
A running daemon holds a KeyRing snapshot and reloads it when the database changes, so a
created or revoked key takes effect within seconds, without a restart.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..stores.sqlite import DATABASE, file_identity, open_database
from .ratelimit import redis_client

KEY_PREFIX = "llp-"
# With redis_url, revoked key hashes are also put in this set, for every instance.
REVOKED_SET = "llproxy:revoked-keys"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    models TEXT NOT NULL,
    expires REAL,
    created REAL NOT NULL,
    revoked REAL,
    rate_limit TEXT
)
"""


# Names show in logs and URLs: a safe set of characters and a bounded length.
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MAX_GLOBS = 100
MAX_GLOB_LENGTH = 200
# The latest expiry a date can show (9999-12-31).
LAST_EXPIRY = 253402300799.0


class KeyFieldError(ValueError):
    """A key's field that cannot be stored; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def check_key_fields(name: str, models: Iterable[str], expires: float | None) -> None:
    """Raise KeyFieldError for a name, glob list or expiry a key must not have."""
    if not KEY_NAME.fullmatch(name):
        raise KeyFieldError(
            "name",
            "must be 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a letter or "
            f"digit; got {name[:80]!r}",
        )
    globs = list(models)
    if len(globs) > MAX_GLOBS:
        raise KeyFieldError("models", f"at most {MAX_GLOBS} globs")
    for glob in globs:
        if not glob or len(glob) > MAX_GLOB_LENGTH or not glob.isprintable():
            raise KeyFieldError(
                "models", f"each glob must be 1 to {MAX_GLOB_LENGTH} printable characters"
            )
    if expires is not None and not (time.time() < expires <= LAST_EXPIRY):
        raise KeyFieldError("expires", "must be a time in the future, before the year 10000")


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def fingerprint(hashed: str) -> str:
    """A short, safe name for a key in logs: never the key itself."""
    return hashed[:8]


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    key_hash: str
    models: tuple[str, ...] = ()  # globs; empty allows every model
    expires: float | None = None
    created: float = 0.0
    revoked: float | None = None
    rate_limit: str | None = None  # overrides the config's rate_limit for this key

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key_hash)

    def allows(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, glob) for glob in self.models)

    def active(self, now: float) -> bool:
        return self.revoked is None and (self.expires is None or now < self.expires)


class KeyStore:
    """The keys table of the state database."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / DATABASE
        self._db = open_database(directory, _SCHEMA)

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
    ) -> str:
        """Store a new key and return its secret, which is never stored or shown again.
        KeyFieldError for a bad field, ValueError when the name is taken."""
        models = list(models)
        check_key_fields(name, models, expires)
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        models_json = orjson.dumps(list(models)).decode()
        try:
            self._db.execute(
                "INSERT INTO api_keys (name, key_hash, models, expires, created, rate_limit) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, key_hash(secret), models_json, expires, time.time(), rate_limit),
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
            "SELECT name, key_hash, models, expires, created, revoked, rate_limit "
            "FROM api_keys ORDER BY name"
        ).fetchall()
        return [
            ApiKey(name, hashed, tuple(orjson.loads(models)), expires, created, revoked, limit)
            for name, hashed, models, expires, created, revoked, limit in rows
        ]

    def version(self) -> int:
        """Changes whenever another connection committed a write."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])


class KeyRing:
    """The keys one process checks requests against: static ones from the config, and the
    database's, reloaded when it changed."""

    def __init__(self, static_secrets: Iterable[str] = (), directory: Path | None = None) -> None:
        self._static = {
            key_hash(secret): ApiKey(f"static-{i + 1}", key_hash(secret))
            for i, secret in enumerate(static_secrets)
        }
        self.directory = directory
        self.store: KeyStore | None = None
        self._file: tuple[int, int] | None = None
        self._version: int | None = None
        self.keys: dict[str, ApiKey] = dict(self._static)
        # Hashes revoked on other instances (shared through Redis).
        self.revoked_elsewhere: frozenset[str] = frozenset()
        self.refresh()

    @property
    def enabled(self) -> bool:
        """Once any key exists (even a revoked one), every API request needs a key."""
        return bool(self.keys)

    def refresh(self) -> None:
        if self.directory is None:
            return
        path = self.directory / DATABASE
        if self.store is not None and self._file != file_identity(path) and path.exists():
            # Replaced (the state directory was deleted and made anew): read the new one.
            # Merely gone, the keys last read stay in force: deleting the state directory
            # must not open the proxy.
            self.store.close()
            self.store, self._version = None, None
        if self.store is None:
            # The database may only appear when the first key is created.
            if not path.exists():
                return
            self.store = KeyStore(self.directory)
            self._file = file_identity(path)
        version = self.store.version()
        if version == self._version:
            return
        self._version = version
        self.keys = {**self._static, **{k.key_hash: k for k in self.store.all()}}

    def authenticate(self, secret: str) -> ApiKey | None:
        hashed = key_hash(secret)
        key = self.keys.get(hashed)
        # The lookup is by hash, so its timing says nothing about the secret; the final
        # comparison is constant-time all the same.
        if key is None or not hmac.compare_digest(hashed, key.key_hash):
            return None
        if hashed in self.revoked_elsewhere:
            return None
        return key if key.active(time.time()) else None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


async def share_revocation(redis_url: str, hashed: str) -> None:
    """Tell every llproxy that shares this Redis that the key is revoked."""
    client = redis_client(redis_url)
    try:
        await client.sadd(REVOKED_SET, hashed)
    finally:
        await client.aclose(close_connection_pool=True)
