"""Rate limits: what a limit says, and the verdict on one request against it.

A limit is `N per [M] unit` (`60 per minute`, `1000 per 15 minutes`, `10/second`), counted
as a moving window: a request is allowed when fewer than N were allowed in the window's
length before it. Who counts is a store (shared memory for one host, Redis for several).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from .errors import ProxyError
from .values import request_value

_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_LIMIT = re.compile(
    r"\s*(\d+)\s*(?:per\s+|/\s*)(\d+)?\s*(second|minute|hour|day)s?\s*", re.IGNORECASE
)


@dataclass(frozen=True, slots=True)
class Limit:
    amount: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.amount} per {self.seconds:g} seconds"


@lru_cache(maxsize=256)
def parse_limit(text: str) -> Limit:
    """`60 per minute`, `1000 per 15 minutes`, `10/second`; ValueError when not a limit."""
    match = _LIMIT.fullmatch(text)
    if match is None:
        raise ValueError(text)
    amount, multiple, unit = match.groups()
    seconds = int(multiple or 1) * _UNITS[unit.lower()]
    if int(amount) < 1 or seconds < 1:
        raise ValueError(text)
    return Limit(int(amount), float(seconds))


@request_value
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset_after: float  # seconds until the window has room again

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(self.remaining),
            "x-ratelimit-reset-requests": f"{math.ceil(self.reset_after)}s",
        }


class RateLimitExceeded(ProxyError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, verdict: Verdict, limit: str) -> None:
        super().__init__(
            f"Rate limit reached: {limit}; retry in {math.ceil(verdict.reset_after)} s"
        )
        self.verdict = verdict

    def headers(self) -> dict[str, str]:
        retry = max(1, math.ceil(self.verdict.reset_after))
        return {**self.verdict.headers(), "Retry-After": str(retry)}
