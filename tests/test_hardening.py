"""The listening side: security headers, no banner, loopback Host check, CORS, slow clients."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from llproxy.config import ConfigError, parse_config

from .conftest import ProxyFactory, RunningProxy, RunningUpstream
from .process import LlproxyProcess

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
Start = Callable[..., Awaitable[LlproxyProcess]]


async def request(
    proxy: RunningProxy, method: str, path: str, body: Any = None, **headers: str
) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"{proxy.url}{path}", json=body, headers=headers) as resp,
    ):
        text = await resp.read()
        return resp.status, dict(resp.headers), orjson.loads(text) if text else None


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", None),
        ("GET", "/health", None),
        ("POST", "/v1/chat/completions", CHAT),
        ("GET", "/v1/nothing", None),
        ("POST", "/v1/chat/completions", {"model": "nope"}),
    ],
)
async def test_security_headers_on_every_response(
    proxy: RunningProxy, method: str, path: str, body: Any
) -> None:
    _, headers, _ = await request(proxy, method, path, body)
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-store"
    assert headers["Server"] == "llproxy"
    assert "Access-Control-Allow-Origin" not in headers


async def test_streams_carry_the_headers_too(proxy: RunningProxy) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}/v1/chat/completions", json={**CHAT, "stream": True}) as resp,
    ):
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Server"] == "llproxy"
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        await resp.read()


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:42069", "127.0.0.1:1", "[::1]:8", "127.0.0.2"]
)
async def test_loopback_host_names_are_accepted(proxy: RunningProxy, host: str) -> None:
    status, _, _ = await request(proxy, "GET", "/v1/models", Host=host)
    assert status == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:42069", "192.168.1.5", ""])
async def test_other_host_names_are_refused_on_loopback(
    proxy: RunningProxy, upstream: RunningUpstream, host: str
) -> None:
    status, _, body = await request(proxy, "POST", "/v1/chat/completions", CHAT, Host=host)
    assert status == 403
    assert body["error"]["code"] == "host_not_allowed"
    assert upstream.fake.generation_requests == []


async def test_allowed_hosts_and_non_loopback_binds(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    named = await start_proxy([upstream.endpoint()], allowed_hosts=["llm.lab.example"])
    assert (await request(named, "GET", "/v1/models", Host="llm.lab.example:443"))[0] == 200
    assert (await request(named, "GET", "/v1/models", Host="other.example"))[0] == 403
    # Bound to all interfaces, Host names are whatever clients use.
    public = await start_proxy([upstream.endpoint()], bindip="0.0.0.0")
    assert (await request(public, "GET", "/v1/models", Host="anything.example"))[0] == 200


async def test_cors_is_off_by_default(proxy: RunningProxy) -> None:
    status, headers, body = await request(
        proxy,
        "OPTIONS",
        "/v1/chat/completions",
        Origin="https://app.example",
        **{"Access-Control-Request-Method": "POST"},
    )
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    assert "Access-Control-Allow-Origin" not in headers
    _, headers, _ = await request(proxy, "GET", "/v1/models", Origin="https://app.example")
    assert "Access-Control-Allow-Origin" not in headers


async def test_cors_allow_list(start_proxy: ProxyFactory, upstream: RunningUpstream) -> None:
    proxy = await start_proxy([upstream.endpoint()], cors_origins=["https://app.example"])
    status, headers, _ = await request(
        proxy,
        "OPTIONS",
        "/v1/chat/completions",
        Origin="https://app.example",
        **{
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    status, headers, _ = await request(
        proxy, "POST", "/v1/chat/completions", CHAT, Origin="https://app.example"
    )
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://app.example"
    status, headers, body = await request(
        proxy, "OPTIONS", "/v1/chat/completions", Origin="https://evil.example"
    )
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    _, headers, _ = await request(proxy, "GET", "/v1/models", Origin="https://evil.example")
    assert "Access-Control-Allow-Origin" not in headers


async def test_a_stream_carries_cors_and_rate_limit_headers(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    # The proxy sends a stream itself, not the gateway: it must still carry every header
    # the gateway puts on an answer.
    proxy = await start_proxy(
        [upstream.endpoint()], cors_origins=["https://app.example"], rate_limit="5 per minute"
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"Origin": "https://app.example"},
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert resp.headers["Vary"] == "Origin"
        assert resp.headers["x-ratelimit-remaining-requests"] == "4"
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert b"data: [DONE]" in await resp.read()


def test_cors_origins_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"cors_origins\[1\]: must be an origin"):
        parse_config({"cors_origins": ["https://ok.example", "not an origin"]})
    with pytest.raises(ConfigError, match=r"allowed_hosts: must be a list"):
        parse_config({"allowed_hosts": "x"})


async def test_stalled_body_gets_408_and_nothing_goes_upstream(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    proxy = await start_proxy([upstream.endpoint()], timeouts={"client_body": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b'Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"mo'
    )
    started = time.monotonic()
    head = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert b'"code":"request_timeout"' in head
    assert time.monotonic() - started < 5
    assert upstream.fake.generation_requests == []


async def test_slow_headers_are_cut_off_by_the_keepalive_timeout(
    start_llproxy: Start, tmp_path: Path
) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"endpoints": [], "timeouts": {"keepalive": 1}}))
    daemon = await start_llproxy("--config", str(config), "--workers", "1")
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n")  # never finished
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 15) == b""  # closed by the server
    writer.close()
    assert time.monotonic() - started < 10


async def test_oversized_header_is_refused_without_a_log_traceback(
    start_llproxy: Start, tmp_path: Path
) -> None:
    config = tmp_path / "c.json"
    config.write_text('{"endpoints": []}')
    daemon = await start_llproxy("--config", str(config), "--workers", "1")
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    writer.write(
        b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.0 400") or head.startswith(b"HTTP/1.1 400")
    async with aiohttp.ClientSession() as session, session.get(f"{daemon.url}/health") as resp:
        assert resp.status == 200  # and the daemon keeps serving
    assert "Traceback" not in daemon.output
