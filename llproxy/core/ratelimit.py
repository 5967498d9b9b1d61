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
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import BlockingConnectionPool, Redis

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


# Connections one worker keeps to Redis. A burst beyond them waits for a free one (up to
# REDIS_WAIT seconds) instead of failing: redis-py's default pool refuses past 100.
REDIS_CONNECTIONS = 32
REDIS_WAIT = 5.0


def redis_client(url: str) -> Redis:
    """An asyncio Redis client on a bounded, blocking pool of connections."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_CONNECTIONS,
        timeout=REDIS_WAIT,
        socket_connect_timeout=2,
        socket_timeout=2,
        decode_responses=True,
    )
    return Redis(connection_pool=pool)


# A moving window in one atomic step, on the server's clock (so hosts whose clocks differ
# count alike): the client's hit times, newest first, at most `limit` of them. A hit is
# allowed when the limit-th newest is older than the window. Returns the verdict, the hits
# in the window, and the oldest of them (as text: Lua numbers would lose the fraction).
_MOVING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local allowed = 0
local last = redis.call('LINDEX', KEYS[1], limit - 1)
if not last or tonumber(last) < now - window then
    redis.call('LPUSH', KEYS[1], string.format('%.6f', now))
    redis.call('LTRIM', KEYS[1], 0, limit - 1)
    redis.call('EXPIRE', KEYS[1], math.ceil(window))
    allowed = 1
end
local count = 0
local oldest = now
for _, hit in ipairs(redis.call('LRANGE', KEYS[1], 0, limit - 1)) do
    local at = tonumber(hit)
    if at < now - window then break end
    count = count + 1
    oldest = at
end
return {allowed, count, string.format('%.6f', oldest + window - now)}
"""


class RedisCounter:
    """The authority for every llproxy sharing one Redis: one script call per request."""

    def __init__(self, url: str) -> None:
        self.client = redis_client(url)
        self._script = self.client.register_script(_MOVING_WINDOW)

    async def hit(self, limit: str, key: str) -> Verdict:
        item = parse_limit(limit)
        window = item.get_expiry()
        allowed, count, reset_after = await self._script(
            keys=[f"llproxy:rate:{item.amount}/{window}:{key}"], args=[window, item.amount]
        )
        return Verdict(
            bool(allowed), item.amount, max(0, item.amount - int(count)), float(reset_after)
        )

    async def close(self) -> None:
        await self.client.aclose(close_connection_pool=True)


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
