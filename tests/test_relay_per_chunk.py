"""The stream relay's short paths for one event a read (a model's server at its pace): the
mending stage, the Anthropic face and the chunk writer each take them, and the client gets
exactly what the general path gives: the same events, drops and ends, and a client that
stops reading still stops the model's server."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from llproxy.core.mend import LoopLimits
from llproxy.core.mend.loops import LoopDetector
from llproxy.core.mend.stream import MendedStream
from llproxy.core.record import RequestRecord
from llproxy.core.sse import Checked, PassThrough
from llproxy.dialects.anthropic import AnthropicStream
from llproxy.server.chunked import ChunkFrames
from llproxy.server.respond import EventStream

from .conftest import ProxyFactory
from .test_choice_reader import encode
from .test_relay_check import (
    WATCHING,
    _Read,
    assert_relays_as_reference,
    event_bytes,
    llama_chunk,
    whole,
)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(event_bytes, min_size=1, max_size=30))
def test_a_mended_stream_read_an_event_at_a_time_passes_what_checking_each_passes(
    events: list[bytes],
) -> None:
    events = whole(events)
    record, source = RequestRecord(), _Read()
    mended = MendedStream(source, WATCHING, record)
    relay = PassThrough(record, shaped=True)

    def reads() -> Iterator[bytes]:
        for i, event in enumerate(events):
            source.ended = i == len(events) - 1
            yield mended._read(event)

    assert_relays_as_reference(relay, reads(), events, record)


def test_a_lone_text_event_alike_the_last_passes_as_it_came_checked() -> None:
    record, source = RequestRecord(), _Read()
    mended = MendedStream(source, WATCHING, record)
    first, second = (encode(llama_chunk(text), "compact") for text in ("Hel", 'lo "you"'))
    assert mended._read(first) == first
    out = mended._read(second)
    assert out == second and type(out) is Checked


def _events(out: bytes) -> list[tuple[str, Any]]:
    """Anthropic events as (name, data), the texts of consecutive text deltas of a block
    joined into one: reads cut differently group the same text differently."""
    events: list[tuple[str, Any]] = []
    for event in out.split(b"\n\n")[:-1]:
        name_line, data_line = event.split(b"\n")
        name, data = name_line.removeprefix(b"event: ").decode(), orjson.loads(data_line[6:])
        delta = data.get("delta") if name == "content_block_delta" else None
        if isinstance(delta, dict) and delta.get("type") == "text_delta":
            last = events[-1] if events else None
            if last and last[0] == name and last[1]["index"] == data["index"]:
                last[1]["delta"]["text"] += delta["text"]
                continue
        if name == "message_start":
            data["message"]["id"] = "-"  # made anew for each stream
        events.append((name, data))
    return events


@settings(max_examples=300, deadline=None)
@given(events=st.lists(event_bytes, min_size=1, max_size=30))
def test_the_anthropic_face_says_the_same_read_an_event_at_a_time_or_at_once(
    events: list[bytes],
) -> None:
    events = whole(events)
    apart_record, together_record = RequestRecord(), RequestRecord()
    apart = AnthropicStream(apart_record, (), 10)
    together = AnthropicStream(together_record, (), 10)
    out_apart = b"".join(apart.feed(event) for event in events) + apart.finish()
    out_together = together.feed(b"".join(events)) + together.finish()
    assert _events(out_apart) == _events(out_together)
    assert apart_record.dropped_chunks == together_record.dropped_chunks


def test_the_anthropic_face_puts_a_text_into_its_event_as_it_came() -> None:
    record = RequestRecord()
    stream = AnthropicStream(record, (), 10)
    stream.feed(encode(llama_chunk("Hi"), "compact"))
    # Escaped as Python's json escapes (not as orjson would): still the same string.
    escaped = encode(llama_chunk('\u00e9 \\ "q"'), "compact").replace("é".encode(), b"\\u00e9")
    out = stream.feed(escaped)
    assert b'"text":"\\u00e9 \\\\ \\"q\\""' in out
    assert _events(out)[0][1]["delta"]["text"] == 'é \\ "q"'
    # Bytes that are not one JSON string are not text: dropped, as the general path does.
    head, _, tail = encode(llama_chunk("\x00"), "compact").partition(b"\\u0000")
    assert stream.feed(head + b"a\\" + tail) == b""
    assert record.dropped_chunks == 1


def test_a_loop_is_found_after_a_text_longer_than_twice_the_window() -> None:
    limits = LoopLimits(min_span=5, repeats=3, max_span=20)  # a window of 65 characters
    detector = LoopDetector(limits)
    # Numbers in a row repeat nothing: no loop through 20 windows' worth of them.
    assert not any(detector.feed(f"{i}.") for i in range(300))
    block = "cycle and "
    fed = 0
    while not detector.feed(block):
        fed += len(block)
        assert fed < len(block) * limits.repeats + 64, "the loop was not found"


def _text(i: int) -> str:
    """10 KB of text that never repeats itself (no loop for the mending stage to cut)."""
    return "".join(hashlib.sha256(f"{i}.{j}".encode()).hexdigest() for j in range(160))


class _Flood:
    """An upstream that streams 10 KB events as fast as its client takes them, counting
    the bytes it got out."""

    def __init__(self, events: int) -> None:
        self.events = events
        self.sent = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "flood", "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(self.events):
            event = encode(llama_chunk(_text(i)), "compact")
            await response.write(event)  # waits while the proxy does not read
            self.sent += len(event)
        await response.write_eof(b"data: [DONE]\n\n")
        return response


async def test_a_client_that_stops_reading_stops_the_upstream_being_read(
    start_proxy: ProxyFactory,
) -> None:
    flood = _Flood(events=4000)  # 40 MB, more than every buffer on the way holds (~11 MB)
    server = TestServer(flood.app())
    await server.start_server()
    try:
        proxy = await start_proxy(
            [{"hostname": "127.0.0.1", "port_start": server.port, "port_end": server.port}]
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
        body = orjson.dumps(
            {"model": "flood", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        )
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        assert head.startswith(b"HTTP/1.1 200")
        # The client reads no more: once every buffer between is full, the upstream
        # cannot write, far short of its whole answer.
        last = -1
        for _ in range(100):
            await asyncio.sleep(0.5)
            if flood.sent == last:
                break
            last = flood.sent
        assert flood.sent == last, "the upstream kept writing"
        assert flood.sent < 30 * 10**6
        # Read on: the rest arrives, in order.
        got = b""
        while b"data: [DONE]" not in got[-64:]:
            data = await asyncio.wait_for(reader.read(2**20), 20)
            assert data, "the stream ended early"
            got += data
        assert flood.sent > 40 * 10**6
        assert got.count(b"data: {") == flood.events
        writer.close()
    finally:
        await server.close()


async def test_chunk_frames_write_what_aiohttp_would_after_the_headers() -> None:
    """With the installed aiohttp, a prepared stream takes the short path (an upgrade that
    changed its writer would fall back to aiohttp's write: this says so), and a client
    reads exactly the chunks written, the ones before and after it."""
    pieces = [b"first", b"x" * 70_000, b"", b"\r\n0\r\n", b"last"]
    taken: list[bool] = []
    drained: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        response = EventStream()
        response.content_type = "text/event-stream"
        await response.prepare(request)
        await response.write(pieces[0])  # the headers leave with it
        frames = ChunkFrames.of(response)
        taken.append(frames is not None)
        assert frames is not None
        drains = 0
        for piece in pieces[1:-1]:
            if frames.write(piece):
                drains += 1
                await frames.drain()
        drained.append(drains)
        await response.write_eof(pieces[-1])
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    server = TestServer(app)
    await server.start_server()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.make_url("/")) as response,
        ):
            assert response.headers["Transfer-Encoding"] == "chunked"
            assert await response.read() == b"".join(pieces)
        assert taken == [True]
        assert drained == [1]  # the 70,000 bytes are past aiohttp's drain mark
    finally:
        await server.close()
