"""Rate limits that are exact: one authority counts every request of a client.

The counting is the `limits` library's moving window, whose `hit()` checks and records in
one atomic step. (aiohttp-ratelimiter, built on the same library, tests and then hits in
two awaited steps, so concurrent requests, or several workers, can all pass the test; it
also takes one fixed limit per route, not one per API key.) The authority is this
process's memory in a single-process app, the supervisor for all workers of a host, or
Redis for every llproxy pointed at it.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from aiohttp import web
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis

from .errors import ProxyError

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
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


@lru_cache(maxsize=256)
def parse_limit(text: str) -> RateLimitItem:
    """`60 per minute`, `1000 per 15 minutes`, `10/second`; ValueError when not a limit."""
    return parse(text)


class Counter:
    """One authority: counts hits in a storage and answers with a Verdict."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.window = MovingWindowRateLimiter(storage)

    async def hit(self, limit: str, key: str) -> Verdict:
        item = parse_limit(limit)
        allowed = await self.window.hit(item, key)
        stats = await self.window.get_window_stats(item, key)
        return Verdict(
            allowed, item.amount, stats.remaining, max(0.0, stats.reset_time - time.time())
        )


def memory_counter() -> Counter:
    return Counter(MemoryStorage())


def redis_client(url: str) -> Redis:
    """An asyncio Redis client for llproxy's own shared state (revoked keys)."""
    return Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2, decode_responses=True)


def redis_counter(url: str) -> Counter:
    # limits names its asyncio Redis scheme async+redis://; users write redis://.
    return Counter(RedisStorage(f"async+{url}", implementation="redispy"))


HitFunction = Callable[[str, str], Awaitable[Verdict]]


def parse_networks(values: Sequence[str]) -> tuple[IpNetwork, ...]:
    """Addresses or networks; a ValueError (`[index]: …`) names the first that is neither."""
    networks = []
    for i, value in enumerate(values):
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"[{i}]: must be an IP address or network, got {value!r}") from None
    return tuple(networks)


def _trusted(address: str, trusted: Sequence[IpNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def client_address(request: web.Request, trusted: Sequence[IpNetwork]) -> str:
    """The client's address. X-Forwarded-For counts only when the peer is a trusted proxy,
    and then the rightmost address that is not itself a trusted proxy is the client (the
    left part of the header is whatever the client chose to send)."""
    peer = request.remote or "-"
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in request.headers.get("X-Forwarded-For", "").split(",")]
    for hop in reversed([h for h in hops if h]):
        if not _trusted(hop, trusted):
            return hop
    return peer
