"""Client API keys: random secrets shown once, known afterwards only by their SHA-256 hash.

SHA-256 rather than a slow password hash: keys are 256 random bits, so nothing is gained
by slowing the hash, and a slow hash would make every request a denial-of-service lever.
A running process checks requests against a KeyRing, which its key store refreshes when
the stored keys change, so a created or revoked key takes effect within seconds.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

KEY_PREFIX = "llp-"
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
    operator: bool = False  # opens the operator interfaces, and nothing else

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key_hash)

    def allows(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, glob) for glob in self.models)

    def active(self, now: float) -> bool:
        return self.revoked is None and (self.expires is None or now < self.expires)


def new_secret() -> str:
    """A new key's secret: 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyRing:
    """The keys one process checks requests against: the config's static ones, and the
    stored ones as the key store last read them."""

    def __init__(self, static_secrets: Iterable[str] = ()) -> None:
        self._static = {
            key_hash(secret): ApiKey(f"static-{i + 1}", key_hash(secret))
            for i, secret in enumerate(static_secrets)
        }
        self.keys: dict[str, ApiKey] = dict(self._static)
        # Hashes revoked on other instances (shared through Redis).
        self.revoked_elsewhere: frozenset[str] = frozenset()
        # Set while a shared key store was never read: whether keys exist is unknown, so
        # every request needs one (a database down at start must not open the proxy).
        self.awaiting_store = False

    @property
    def enabled(self) -> bool:
        """Once any client key exists (even a revoked one), every API request needs a
        key. Operator keys do not count: they never call models."""
        return self.awaiting_store or any(not key.operator for key in self.keys.values())

    def replace(self, stored: Iterable[ApiKey]) -> None:
        self.keys = {**self._static, **{k.key_hash: k for k in stored}}

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

    def lapsed(self, key: ApiKey) -> str | None:
        """Why a key that opened something no longer holds (revoked, expired, deleted),
        or None while it does: an open operator socket is checked with it."""
        current = self.keys.get(key.key_hash)
        if current is None:
            return "deleted"
        if current.revoked is not None or key.key_hash in self.revoked_elsewhere:
            return "revoked"
        return None if current.active(time.time()) else "expired"


def key_status(key: ApiKey, now: float) -> str:
    if key.revoked is not None:
        return "revoked"
    return "active" if key.active(now) else "expired"


def key_rows(keys: Iterable[ApiKey]) -> list[dict[str, Any]]:
    """Keys as `keys list --json` and the admin API show them: never a secret."""
    now = time.time()
    return [
        {
            "name": k.name,
            "fingerprint": k.fingerprint,
            "models": list(k.models),
            "created": k.created,
            "expires": k.expires,
            "revoked": k.revoked,
            "rate_limit": k.rate_limit,
            "role": "operator" if k.operator else "client",
            "status": key_status(k, now),
        }
        for k in keys
    ]
