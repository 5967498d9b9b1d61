"""Shared state in Redis, for several llproxy hosts behind one load balancer: their rate
limits, and the keys revoked on any of them.

Each worker keeps a bounded, blocking pool of connections: a burst waits for a free one
instead of failing (redis-py's default pool refuses past 100 connections).
"""

from __future__ import annotations

import asyncio

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from ..core.ratelimit import Verdict, parse_limit

REDIS_CONNECTIONS = 32
REDIS_WAIT = 5.0  # seconds a request may wait for a free connection
PROBE_WAIT = 1.0  # for /health's probe
# Hashes of revoked keys, for every instance.
REVOKED_SET = "llproxy:revoked-keys"


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
# in the window, and the seconds until the oldest leaves it (as text: Lua numbers would
# lose the fraction).
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
    """The rate counter for every llproxy sharing one Redis: one script call a request."""

    def __init__(self, url: str) -> None:
        self.client = redis_client(url)
        self._script = self.client.register_script(_MOVING_WINDOW)

    async def hit(self, limit: str, client: str) -> Verdict:
        parsed = parse_limit(limit)
        allowed, count, reset_after = await self._script(
            keys=[f"llproxy:rate:{parsed.amount}/{parsed.seconds:g}:{client}"],
            args=[parsed.seconds, parsed.amount],
        )
        return Verdict(
            bool(allowed), parsed.amount, max(0, parsed.amount - int(count)), float(reset_after)
        )

    async def probe(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.client.ping(), PROBE_WAIT))
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self.client.aclose(close_connection_pool=True)


class Revocations:
    """Keys revoked on any instance sharing this Redis."""

    def __init__(self, url: str) -> None:
        self.client = redis_client(url)

    async def share(self, hashed: str) -> None:
        await self.client.sadd(REVOKED_SET, hashed)

    async def all(self) -> frozenset[str]:
        return frozenset(map(str, await self.client.smembers(REVOKED_SET)))

    async def close(self) -> None:
        await self.client.aclose(close_connection_pool=True)
