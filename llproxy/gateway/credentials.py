"""The one reading of credentials from a request's headers, for clients, the admin and
operators alike: `Authorization: Bearer <secret>`, `x-api-key: <secret>` or (Gemini's
clients) `x-goog-api-key: <secret>`."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from ..core.keys import key_hash


def presented_secret(headers: Mapping[str, str], *, x_api_key: bool = True) -> str:
    """The secret the request presents; "" when it presents none."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if not x_api_key:
        return ""
    return (headers.get("x-api-key") or headers.get("x-goog-api-key") or "").strip()


def matches(secret: str, expected_hash: str) -> bool:
    """Whether a secret is the one hashed: compared in constant time, digests of equal
    length, so not even the length of the expected secret leaks."""
    return hmac.compare_digest(key_hash(secret), expected_hash)
