"""Rate limits at the gateway: who the client is, which limit applies to it, and the
check that counts the request (429 and nothing upstream when it is over)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence

from aiohttp import web

from ..config import IpNetwork
from ..core.errors import ServiceUnavailable
from ..core.keys import ApiKey
from ..core.ratelimit import RateLimitExceeded, Verdict
from ..stores import RateCounter

log = logging.getLogger("llproxy.gateway")


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


def applicable_limit(default: str | None, key: ApiKey | None) -> str | None:
    """The limit that applies to this client: its key's own, else the config's."""
    return key.rate_limit if key is not None and key.rate_limit else default


async def check_limit(counter: RateCounter, limit: str, client: str, keyed: bool) -> Verdict:
    """Count the request; RateLimitExceeded when it is over the limit, ServiceUnavailable
    when the counter cannot answer (a request is refused rather than left uncounted)."""
    # Separate namespaces: a key named like an address must not share its counter.
    name = f"key:{client}" if keyed else f"ip:{client}"
    try:
        verdict = await counter.hit(limit, name)
    except ServiceUnavailable:
        raise
    except Exception as exc:  # Redis down or similar
        log.error("rate limiter failed: %s", exc)
        raise ServiceUnavailable("the rate limiter is unavailable") from None
    if not verdict.allowed:
        raise RateLimitExceeded(verdict, limit)
    return verdict
