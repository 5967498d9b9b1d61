"""A request body that came whole with its headers is taken from aiohttp's buffer at once
(server/body.py): every way it can come whole (many chunks, compressed and chunked,
after `Expect: 100-continue` without waiting, pipelined behind another request) reaches
the upstream whole, on raw HTTP."""

from __future__ import annotations

import gzip

import orjson
import pytest

from .conftest import ProxyFactory, RunningUpstream
from .test_hardening import CHAT, raw_exchange

HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
)
# Long enough that a read of only its first chunk or buffered piece would be cut short.
MESSAGES = [{"role": "user", "content": f"part {i} " + "x" * 200} for i in range(20)]
BODY = orjson.dumps({**CHAT, "messages": MESSAGES})


def chunked(data: bytes, size: int) -> bytes:
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def sized(data: bytes) -> bytes:
    return b"Content-Length: %d\r\n\r\n%s" % (len(data), data)


@pytest.mark.parametrize(
    ("request_bytes", "answers"),
    [
        (HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(BODY, 7), 1),
        (
            HEAD
            + b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked(gzip.compress(BODY), 50),
            1,
        ),
        (HEAD + b"Expect: 100-continue\r\n" + sized(BODY), 1),
        (HEAD + sized(BODY) + HEAD + b"Connection: close\r\n" + sized(BODY), 2),
    ],
    ids=["many-chunks", "gzip-chunked", "expect-continue-not-waited", "pipelined"],
)
async def test_a_body_that_came_with_its_headers_reaches_the_upstream_whole(
    start_proxy: ProxyFactory, upstream: RunningUpstream, request_bytes: bytes, answers: int
) -> None:
    proxy = await start_proxy([upstream.endpoint()], max_request_bytes=len(BODY) + 100)
    if answers == 1:
        request_bytes = request_bytes.replace(HEAD, HEAD + b"Connection: close\r\n", 1)
    answer = await raw_exchange(proxy.server.port, request_bytes, read_timeout=10)
    assert answer.count(b"HTTP/1.1 200 OK") == answers, answer[:300]
    received = upstream.fake.generation_requests
    assert [r.body["messages"] for r in received] == [MESSAGES] * answers
