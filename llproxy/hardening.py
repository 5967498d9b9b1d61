"""Safety of the listening side: security headers, the loopback Host check, CORS.

A proxy bound to loopback is reachable from any web page the user opens, through DNS
rebinding (a hostile name that resolves to 127.0.0.1): refusing Host names that are not
loopback (or explicitly allowed) closes that door. CORS is off unless origins are listed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from aiohttp import web

from .config import Config
from .errors import ProxyError

SECURITY_HEADERS: Mapping[str, str] = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    # No version banner: aiohttp would announce Python's and its own.
    "Server": "llproxy",
}
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
_CORS_ALLOWED_HEADERS = "Authorization, Content-Type, X-Api-Key, OpenAI-Organization, OpenAI-Beta"


class HostNotAllowed(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "host_not_allowed"


class OriginNotAllowed(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "origin_not_allowed"


def host_name(host_header: str) -> str:
    """The name in a Host header, without port: `[::1]:80` → `::1`, `a.b:8` → `a.b`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def accepted_hosts(config: Config) -> tuple[str, ...] | None:
    """Host names accepted besides loopback ones; None when any is (not bound to loopback).
    Decided once at startup: it is asked on every request."""
    return config.allowed_hosts if config.loopback_only else None


def check_host(request: web.Request, accepted: tuple[str, ...] | None) -> None:
    if accepted is None:
        return
    header = request.headers.get("Host", "")
    if _host_accepted(header, accepted):
        return
    name = host_name(header)
    raise HostNotAllowed(
        f"Host '{name}' is not accepted by a proxy bound to loopback; "
        "add it to allowed_hosts if this is intended"
    )


# Asked on every request, with the same one or two Host values.
@functools.lru_cache(maxsize=64)
def _host_accepted(header: str, accepted: tuple[str, ...]) -> bool:
    name = host_name(header)
    return name in _LOOPBACK_NAMES or name.startswith("127.") or name in accepted


def allowed_origin(config: Config, request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if origin is None or not config.cors_origins:
        return None
    if "*" in config.cors_origins or origin.rstrip("/") in config.cors_origins:
        return origin
    return None


def response_headers(config: Config, request: web.Request) -> Mapping[str, str]:
    """The headers every answer to this request carries: the security headers, and the CORS
    ones when origins are configured. Not to be changed: usually the shared constant."""
    if not config.cors_origins:
        return SECURITY_HEADERS
    headers = {**SECURITY_HEADERS, "Vary": "Origin"}
    origin = allowed_origin(config, request)
    if origin is not None:
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Expose-Headers"] = "*"
    return headers


async def preflight(request: web.Request, config: Config) -> web.Response:
    origin = allowed_origin(config, request)
    if origin is None:
        raise OriginNotAllowed(f"origin {request.headers.get('Origin')!r} is not allowed")
    requested = request.headers.get("Access-Control-Request-Headers", "")
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": requested or _CORS_ALLOWED_HEADERS,
            "Access-Control-Max-Age": "600",
        },
    )
