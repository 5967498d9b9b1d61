"""Safety of the listening side: security headers, the loopback Host check, CORS.

A proxy bound to loopback is reachable from any web page the user opens, through DNS
rebinding (a hostile name that resolves to 127.0.0.1): refusing Host names that are not
loopback (or explicitly allowed) closes that door. CORS is off unless origins are listed.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping

from aiohttp import web

from ..config import Config
from ..core.errors import ProxyError

SECURITY_HEADERS: Mapping[str, str] = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    # No version banner: aiohttp would announce Python's and its own.
    "Server": "llproxy",
}
_CORS_ALLOWED_HEADERS = "Authorization, Content-Type, X-Api-Key, OpenAI-Organization, OpenAI-Beta"


class HostNotAllowed(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "host_not_allowed"


class OriginNotAllowed(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "origin_not_allowed"


# A DNS name: dot-separated labels of letters, digits, `-` and `_`, an optional final dot.
_LABEL = r"[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?"
_REG_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_PORT = re.compile(r"[0-9]{1,5}")


def host_name(host_header: str) -> str | None:
    """The name in a Host header, lower case and without its port (`[::1]:80` → `::1`,
    `a.b:8` → `a.b`); None when the header is not a well-formed `host[:port]`."""
    host = host_header.lower()
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
        if not bracket or (rest and not (rest[:1] == ":" and _PORT.fullmatch(rest[1:]))):
            return None
        return name
    name, colon, port = host.partition(":")
    if colon and not _PORT.fullmatch(port):
        return None
    return name if _REG_NAME.fullmatch(name) else None


def is_loopback_name(name: str) -> bool:
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def accepted_hosts(config: Config) -> frozenset[str] | None:
    """Host names accepted besides loopback ones; None when any is (not bound to loopback).
    Decided once at startup: it is asked on every request."""
    if not config.loopback_only:
        return None
    return frozenset(name.lower().rstrip(".") for name in config.allowed_hosts)


def check_host(request: web.Request, accepted: frozenset[str] | None) -> None:
    """Refuse a request whose Host (or absolute request target) names anything but this
    machine's loopback or an allowed name: what a DNS-rebinding page would send."""
    if accepted is None:
        return
    header = request.headers.get("Host", "")
    if not _host_accepted(header, accepted):
        raise _host_refused(header)
    # An absolute-form target (`GET http://name/ HTTP/1.1`) names the host itself.
    if request.host != header and not _host_accepted(request.host, accepted):
        raise _host_refused(request.host)


def _host_refused(value: str) -> HostNotAllowed:
    return HostNotAllowed(
        f"Host {value[:100]!r} is not accepted by a proxy bound to loopback; "
        "add its name to allowed_hosts if this is intended"
    )


# Asked on every request, with the same one or two Host values.
@functools.lru_cache(maxsize=64)
def _host_accepted(header: str, accepted: frozenset[str]) -> bool:
    name = host_name(header)
    if name is None:
        return False
    return is_loopback_name(name) or name.rstrip(".") in accepted


def check_origin(config: Config, request: web.Request) -> None:
    """Refuse a browser's cross-site request unless cors_origins allows its origin.

    Without keys, anything that reaches the port may spend the user's models; any web page
    the user visits can send a form or a `text/plain` POST here without a preflight. A
    browser says where a request comes from (`Origin`, `Sec-Fetch-Site`); requests without
    them (curl, SDKs, servers) are not a browser's and pass.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        if request.headers.get("Sec-Fetch-Site") == "cross-site":
            raise OriginNotAllowed("a cross-site request from a web page is refused")
        return
    if "*" in config.cors_origins or origin.rstrip("/") in config.cors_origins:
        return
    if _same_origin(origin, request.headers.get("Host", "")):
        return
    raise OriginNotAllowed(
        f"requests from the web page origin {origin[:200]!r} are refused; "
        "add it to cors_origins to allow them"
    )


def _same_origin(origin: str, host_header: str) -> bool:
    """Whether a page of this proxy itself sent the request (its own web pages do)."""
    scheme, sep, authority = origin.lower().partition("://")
    return bool(sep) and scheme in ("http", "https") and authority == host_header.lower()


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


def preflight_headers(config: Config, request: web.Request) -> dict[str, str]:
    """The answer to a CORS preflight from an allowed origin; OriginNotAllowed else."""
    origin = allowed_origin(config, request)
    if origin is None:
        raise OriginNotAllowed(f"origin {request.headers.get('Origin')!r} is not allowed")
    requested = request.headers.get("Access-Control-Request-Headers", "")
    return {
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": requested or _CORS_ALLOWED_HEADERS,
        "Access-Control-Max-Age": "600",
    }
