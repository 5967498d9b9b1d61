"""The upstream HTTP/1.1 client against scripted raw servers on 127.0.0.1.

Each server answers with exactly the bytes a test gives it, so the client meets the
framings, encodings and misbehaviours real upstreams produce: lengths, chunks, bodies cut
by a close, gzip, interim 100s, idle closes, garbage.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from llproxy.backends.openai_http.transport import (
    HIGH_WATER,
    MAX_HEAD_BYTES,
    ConnectFailed,
    UpstreamBroken,
    UpstreamPool,
    request_path,
)
from llproxy.core.registry import Upstream

from .conftest import free_port_block

Script = Callable[["Served", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Served:
    """What a scripted server saw: one entry per connection, each a list of request heads."""

    port: int = 0
    connections: list[list[bytes]] = field(default_factory=list)
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head and body) from the connection; None when the client closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.closed_by_client.set()
            return None
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        self.connections[-1].append(head)
        return head

    async def wait_closed_by_client(self, reader: asyncio.StreamReader) -> None:
        if await reader.read() == b"":
            self.closed_by_client.set()


@asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[Served]:
    served = Served()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.connections.append([])
        try:
            await script(served, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    served.port = server.sockets[0].getsockname()[1]
    try:
        yield served
    finally:
        server.close()


def upstream_at(port: int, apikey: str | None = None) -> Upstream:
    return Upstream(
        base_url=f"http://127.0.0.1:{port}/v1", hostname="127.0.0.1", port=port, apikey=apikey
    )


def answer(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = "".join(f"{h}\r\n" for h in (f"Content-Length: {len(body)}", *headers))
    return f"HTTP/1.1 {status}\r\n{head}\r\n".encode() + body


async def fetch(pool: UpstreamPool, upstream: Upstream) -> bytes:
    """One request's whole body, its connection handed back to the pool."""
    response = await asyncio.wait_for(pool.post(upstream, "completions", b"{}"), 10)
    body = await asyncio.wait_for(response.read(), 10)
    response.release()
    return body


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(connect_timeout=5.0, keepalive=4.0)
    yield pool
    await pool.close()


async def keep_answering(
    served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    while await served.read_request(reader) is not None:
        writer.write(answer(b'{"ok": true}', "Content-Type: application/json; charset=utf-8"))


async def test_response_and_the_connection_is_reused(pool: UpstreamPool) -> None:
    async with scripted(keep_answering) as served:
        upstream = upstream_at(served.port, apikey="upstream-secret")
        for _ in range(3):
            response = await pool.post(upstream, "chat/completions", b'{"model": "m"}')
            assert response.status == 200
            assert response.content_type == "application/json"
            assert await response.read() == b'{"ok": true}'
            response.release()
    assert len(served.connections) == 1 and len(served.connections[0]) == 3
    head = served.connections[0][0]
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{served.port}\r\n".encode() in head
    assert b"Authorization: Bearer upstream-secret\r\n" in head
    assert b"Content-Length: 14\r\n" in head


async def test_chunks_arrive_before_the_response_ends(pool: UpstreamPool) -> None:
    more = asyncio.Event()

    async def chunked(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await served.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await more.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await served.read_request(reader)

    async with scripted(chunked) as served:
        response = await pool.post(upstream_at(served.port), "completions", b"{}")
        assert await asyncio.wait_for(response.chunk(), 10) == b"first"
        more.set()
        assert await response.read() == b"second"
        assert response.at_eof()
        response.release()


async def test_body_delimited_by_close(pool: UpstreamPool) -> None:
    async def until_close(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await served.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        await writer.drain()

    async with scripted(until_close) as served:
        upstream = upstream_at(served.port)
        for _ in range(2):  # the closed connection is not pooled
            assert await fetch(pool, upstream) == b"all of it"
    assert [len(requests) for requests in served.connections] == [1, 1]


async def test_gzip_body_is_decoded(pool: UpstreamPool) -> None:
    async def gzipped(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await served.read_request(reader)
        writer.write(answer(gzip.compress(b'{"packed": 1}'), "Content-Encoding: gzip"))

    async with scripted(gzipped) as served:
        assert await fetch(pool, upstream_at(served.port)) == b'{"packed": 1}'


async def test_interim_100_is_skipped(pool: UpstreamPool) -> None:
    async def continue_first(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await served.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"late", status="201 Created"))

    async with scripted(continue_first) as served:
        response = await pool.post(upstream_at(served.port), "completions", b"{}")
        assert response.status == 201
        assert await response.read() == b"late"
        response.release()


@pytest.mark.parametrize(
    "reply",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["not-http", "bad-length", "huge-head", "unknown-encoding"],
)
async def test_broken_answers_raise_upstream_broken(pool: UpstreamPool, reply: bytes) -> None:
    async def broken(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await served.read_request(reader)
        writer.write(reply)
        await served.wait_closed_by_client(reader)

    async with scripted(broken) as served:
        with pytest.raises(UpstreamBroken):
            await asyncio.wait_for(pool.post(upstream_at(served.port), "completions", b"{}"), 10)
        # The broken connection is dropped, not pooled.
        await asyncio.wait_for(served.closed_by_client.wait(), 10)


async def test_close_mid_body_raises_upstream_broken(pool: UpstreamPool) -> None:
    async def cut(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await served.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")

    async with scripted(cut) as served:
        response = await pool.post(upstream_at(served.port), "completions", b"{}")
        with pytest.raises(UpstreamBroken):
            await asyncio.wait_for(response.read(), 10)
        response.close()


async def test_refused_connection_raises_connect_failed(pool: UpstreamPool) -> None:
    with pytest.raises(ConnectFailed):
        await pool.post(upstream_at(free_port_block(1)), "completions", b"{}")


async def test_pooled_connection_closed_by_upstream_is_retried_once(pool: UpstreamPool) -> None:
    async def close_the_first_on_its_second_request(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        first_connection = len(served.connections) == 1
        while await served.read_request(reader) is not None:
            if first_connection and len(served.connections[0]) == 2:
                return  # as an upstream closing an idle connection just as it is reused
            writer.write(answer(b"answer %d" % len(served.connections)))

    async with scripted(close_the_first_on_its_second_request) as served:
        upstream = upstream_at(served.port)
        assert await fetch(pool, upstream) == b"answer 1"
        assert await fetch(pool, upstream) == b"answer 2"
    assert [len(requests) for requests in served.connections] == [2, 1]


async def test_fresh_connection_closed_without_answer_is_not_retried(pool: UpstreamPool) -> None:
    async def hang_up(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await served.read_request(reader)

    async with scripted(hang_up) as served:
        with pytest.raises(UpstreamBroken):
            await asyncio.wait_for(pool.post(upstream_at(served.port), "completions", b"{}"), 10)
    assert [len(requests) for requests in served.connections] == [1]


async def test_cancelled_request_drops_its_connection(pool: UpstreamPool) -> None:
    async def silent(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await served.read_request(reader)
        await served.wait_closed_by_client(reader)

    async with scripted(silent) as served:
        waiting = asyncio.create_task(pool.post(upstream_at(served.port), "completions", b"{}"))
        while not served.connections or not served.connections[0]:
            await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.wait_for(served.closed_by_client.wait(), 10)


async def test_slow_reader_stops_the_upstream_socket_being_read(pool: UpstreamPool) -> None:
    size = 32 * 1024 * 1024
    backlog: list[int] = []

    async def flood(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await served.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await asyncio.sleep(0.5)  # the client reads nothing meanwhile
        backlog.append(writer.transport.get_write_buffer_size())
        await writer.drain()
        await served.read_request(reader)

    async with scripted(flood) as served:
        response = await pool.post(upstream_at(served.port), "completions", b"{}")
        while not backlog:
            await asyncio.sleep(0.05)
        # Without flow control the client would have taken it all into memory; with it,
        # most of the body still waits at the server.
        assert backlog[0] > size - 8 * 1024 * 1024 - HIGH_WATER
        assert len(await asyncio.wait_for(response.read(), 30)) == size
        response.release()


async def test_idle_connections_are_closed_after_keepalive() -> None:
    pool = UpstreamPool(connect_timeout=5.0, keepalive=0.2)
    try:

        async def answer_then_wait(
            served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await served.read_request(reader)
            writer.write(answer(b"ok"))
            await served.wait_closed_by_client(reader)

        async with scripted(answer_then_wait) as served:
            assert await fetch(pool, upstream_at(served.port)) == b"ok"
            await asyncio.wait_for(served.closed_by_client.wait(), 10)
    finally:
        await pool.close()


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("chat/completions", "chat/completions"),
        ("a b?c#d", "a%20b%3Fc%23d"),
        ("x\r\nHost: evil", "x%0D%0AHost:%20evil"),
    ],
)
def test_request_path_is_encoded(path: str, expected: str) -> None:
    assert request_path(path) == expected


@pytest.mark.parametrize("path", ["../admin", "chat/../../x", "./x", "chat//completions", "x/"])
def test_request_path_refuses_dot_and_empty_segments(path: str) -> None:
    with pytest.raises(ValueError):
        request_path(path)


@asynccontextmanager
async def tls_server(ca: trustme.CA) -> AsyncIterator[Served]:
    served = Served()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.connections.append([])
        try:
            await keep_answering(served, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    served.port = server.sockets[0].getsockname()[1]
    try:
        yield served
    finally:
        server.close()


def tls_upstream(port: int) -> Upstream:
    return Upstream(base_url=f"https://127.0.0.1:{port}/v1", hostname="127.0.0.1", port=port)


async def test_https_upstream_with_a_trusted_certificate(
    pool: UpstreamPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # the system store, here
    async with tls_server(ca) as served:
        response = await pool.post(tls_upstream(served.port), "chat/completions", b"{}")
        assert response.status == 200 and await response.read() == b'{"ok": true}'
        response.release()
    assert f"Host: 127.0.0.1:{served.port}\r\n".encode() in served.connections[0][0]


async def test_https_upstream_with_an_untrusted_certificate_is_refused(
    pool: UpstreamPool,
) -> None:
    async with tls_server(trustme.CA()) as served:
        with pytest.raises(ConnectFailed):
            await pool.post(tls_upstream(served.port), "chat/completions", b"{}")
    assert served.connections == [] or served.connections == [[]]  # no request was sent


async def test_base_url_path_and_key_outside_ascii_are_sent_safely(pool: UpstreamPool) -> None:
    async with scripted(keep_answering) as served:
        upstream = Upstream(
            base_url=f"http://127.0.0.1:{served.port}/my models/v1",
            hostname="127.0.0.1",
            port=served.port,
            apikey="clé-secrète",
        )
        assert await fetch(pool, upstream) == b'{"ok": true}'
    head = served.connections[0][0]
    assert head.startswith(b"POST /my%20models/v1/completions HTTP/1.1\r\n")
    assert "Authorization: Bearer clé-secrète\r\n".encode() in head
