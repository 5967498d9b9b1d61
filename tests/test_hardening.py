"""The listening side: security headers, no banner, loopback Host check, CORS, slow clients."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time
import zlib
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


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:42069",
        "192.168.1.5",
        "",
        # Each starts with a loopback name: only the whole name counts.
        "127.0.0.1.attacker.example",
        "127.0.0.1x",
        "127.0.0.1@evil",
        "127.0.0.1 evil",
        "localhost:42100.evil",
        "localhost.evil.example",
        "[::1]x",
        "[::1]:80:80",
        "[::1.evil]",
        "localhost:",
        "localhost:999999",
    ],
)
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
    # A page of another origin is refused outright, its preflight included.
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in headers
    status, headers, _ = await request(proxy, "GET", "/v1/models", Origin="https://app.example")
    assert status == 403 and "Access-Control-Allow-Origin" not in headers


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


async def raw_exchange(port: int, data: bytes, read_timeout: float = 10) -> bytes:
    """Send raw bytes, return everything the server answers until it closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    answer = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), read_timeout):
            answer += chunk
    except TimeoutError:
        pass
    writer.close()
    return answer


async def test_an_absolute_request_target_names_the_host_too(
    proxy: RunningProxy, upstream: RunningUpstream
) -> None:
    body = orjson.dumps(CHAT)
    answer = await raw_exchange(
        proxy.server.port,
        b"POST http://evil.example/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
    )
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert b'"code":"host_not_allowed"' in answer
    assert upstream.fake.generation_requests == []
    ok = await raw_exchange(
        proxy.server.port,
        b"GET http://localhost:1/v1/models HTTP/1.1\r\n"
        b"Host: localhost\r\nConnection: close\r\n\r\n",
    )
    assert ok.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    ("headers", "content_type"),
    [
        ({"Origin": "https://evil.example"}, "text/plain"),
        ({"Origin": "https://evil.example"}, "application/json"),
        ({"Origin": "null"}, "application/x-www-form-urlencoded"),
        ({"Origin": "http://localhost:3000"}, "text/plain"),  # another local page
        ({"Sec-Fetch-Site": "cross-site"}, "text/plain"),
    ],
)
async def test_cross_site_browser_requests_are_refused(
    proxy: RunningProxy, upstream: RunningUpstream, headers: dict[str, str], content_type: str
) -> None:
    """Without keys, a web page the user visits must not spend their models."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}/v1/chat/completions",
            data=orjson.dumps(CHAT),
            headers={"Content-Type": content_type, **headers},
        ) as resp,
    ):
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "origin_not_allowed"
    assert upstream.fake.generation_requests == []


async def test_same_origin_and_allowed_origins_pass(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    proxy = await start_proxy([upstream.endpoint()], cors_origins=["https://app.example"])
    own = f"http://127.0.0.1:{proxy.server.port}"
    for origin, site in ((own, "same-origin"), ("https://app.example", "cross-site")):
        status, _, body = await request(
            proxy,
            "POST",
            "/v1/chat/completions",
            CHAT,
            Origin=origin,
            **{"Sec-Fetch-Site": site},
        )
        assert status == 200, body
    # No Origin at all: curl, SDKs and servers are not browsers.
    assert (await request(proxy, "POST", "/v1/chat/completions", CHAT))[0] == 200


@pytest.mark.parametrize(
    ("encoding", "data", "status", "code"),
    [
        ("gzip", gzip.compress(orjson.dumps(CHAT)), 200, None),
        ("deflate", zlib.compress(orjson.dumps(CHAT)), 200, None),
        ("gzip", b"this is not gzip", 400, None),
        ("br", b"\x0b\x02\x80hello\x03", 415, "unsupported_media_type"),
        ("gzip", gzip.compress(b" " * (3 * 1024 * 1024)), 413, "request_too_large"),
    ],
)
async def test_compressed_request_bodies_are_decoded_within_the_limit(
    start_proxy: ProxyFactory,
    upstream: RunningUpstream,
    encoding: str,
    data: bytes,
    status: int,
    code: str | None,
) -> None:
    proxy = await start_proxy([upstream.endpoint()], max_request_bytes=1024 * 1024)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}/v1/chat/completions",
            data=data,
            headers={"Content-Type": "application/json", "Content-Encoding": encoding},
        ) as resp,
    ):
        body = await resp.json()
        assert resp.status == status, body
    if status == 200:
        assert upstream.fake.generation_requests[-1].body["messages"] == CHAT["messages"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert code is None or body["error"]["code"] == code
        assert upstream.fake.generation_requests == []


async def test_expect_continue_over_the_limit_is_refused_before_the_body(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    proxy = await start_proxy([upstream.endpoint()], max_request_bytes=1000)
    answer = await raw_exchange(
        proxy.server.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
        b"Content-Length: 21000000\r\n\r\n",
        read_timeout=5,
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert b"100 Continue" not in answer
    # Within the limit, the client is told to go on, and then answered.
    body = orjson.dumps(CHAT)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    final = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert final.startswith(b"HTTP/1.1 200")


async def test_expect_continue_for_a_refused_key_gets_no_continue(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    proxy = await start_proxy([upstream.endpoint()], api_keys=["k" * 20])
    answer = await raw_exchange(
        proxy.server.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 50\r\n\r\n",
        read_timeout=5,
    )
    assert answer.startswith(b"HTTP/1.1 401") and b"100 Continue" not in answer


PARSER_ERRORS = {
    "target *": b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "long url": b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "tab in path": b"GET /v1/mo\tdels HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "method FOO": b"FOO /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "key in a bad header": b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n"
    b"Authorization: Bearer llp-topsecretkey1234567890\x01\r\n\r\n",
}


async def test_parser_errors_are_openai_shaped_without_a_banner(
    start_llproxy: Start, tmp_path: Path
) -> None:
    """What aiohttp's parser refuses gets JSON with the security headers, and at -vv the
    log has one line per request, with no key and no traceback."""
    config = tmp_path / "c.json"
    config.write_text('{"endpoints": []}')
    daemon = await start_llproxy("--config", str(config), "--workers", "1", "-vv")
    for name, data in PARSER_ERRORS.items():
        answer = await raw_exchange(daemon.port, data, read_timeout=5)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert re.match(rb"HTTP/\d\.\d 4\d\d ", head), (name, answer[:300])
        headers = head.decode("latin-1").lower()
        assert "content-type: application/json" in headers, name
        assert "x-content-type-options: nosniff" in headers, name
        assert "x-should-retry: false" in headers, name
        assert "server: llproxy" in headers and "aiohttp" not in answer.decode("latin-1"), name
        error = orjson.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert error["type"] == "invalid_request_error", name
    async with aiohttp.ClientSession() as session:
        assert (await daemon.health(session))["status"] == "ok"
    await daemon.wait_for("malformed request from")
    assert "topsecretkey" not in daemon.output
    assert "Traceback" not in daemon.output


async def test_a_chunked_body_over_the_limit_is_refused_whole_or_in_parts(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    """A chunked body has no announced length: its size is checked as it is read, whether
    it came with the headers (read at once) or later (read as it comes)."""
    proxy = await start_proxy([upstream.endpoint()], max_request_bytes=1000)
    body = orjson.dumps({**CHAT, "padding": "x" * 2000})
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    whole = await raw_exchange(proxy.server.port, head + chunked, read_timeout=5)
    assert whole.startswith(b"HTTP/1.1 413"), whole[:100]
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(head)
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler starts reading before the body is in
    writer.write(chunked)
    later = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert later.startswith(b"HTTP/1.1 413"), later[:100]
    assert b"request_too_large" in whole and b"request_too_large" in later
    assert upstream.fake.generation_requests == []
