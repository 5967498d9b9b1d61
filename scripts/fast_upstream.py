"""A fast fake OpenAI-compatible upstream for load tests: a bare asyncio protocol on uvloop.

It answers `GET /v1/models`, and `POST /v1/chat/completions` with a fixed JSON body, or
with N server-sent-event chunks when the body asks for `"stream": true`. With --delay the
stream's first chunk comes after --first-ms and every next one after --gap-ms, to show
whether a proxy forwards chunks as they arrive; with --paced too, one timer (every
--tick-ms) writes the chunks of every stream that is due, so thousands of streams cost
no timer each. It must never be the bottleneck, so it parses only what it needs: the
request line, Content-Length and the stream flag. With --anthropic it is a Messages API
instead (`POST /v1/messages`): the same N text pieces as the events the real API streams;
it lists no models, so an endpoint in front of it names them (`claude-bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from collections import defaultdict

import orjson
import uvloop

MODEL = "bench-model"
COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Hello from the fast upstream."},
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
    }
)
MODELS = orjson.dumps(
    {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 1, "owned_by": "bench"}],
    }
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def _json_response(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


_EVENTS: dict[tuple[int, int], bytes] = {}


def _cached_event(index: int) -> bytes:
    """_event(index), made once per second: `created` changes only that often."""
    key = (index, int(time.time()))
    event = _EVENTS.get(key)
    if event is None:
        if len(_EVENTS) > 100_000:
            _EVENTS.clear()
        event = _EVENTS[key] = _event(index)
    return event


def _event(index: int) -> bytes:
    # The shape llama.cpp's server writes (recorded from llama-server): the chunks of an
    # answer differ only in their text and, from one second to the next, `created`.
    payload = orjson.dumps(
        {
            "choices": [{"finish_reason": None, "index": 0, "delta": {"content": f"tok{index} "}}],
            "created": int(time.time()),
            "id": "chatcmpl-bench",
            "model": MODEL,
            "system_fingerprint": "b0-unknown",
            "object": "chat.completion.chunk",
        }
    )
    return _chunk(b"data: " + payload + b"\n\n")


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
STREAM_END = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def _anthropic_event(name: str, **data: object) -> bytes:
    # The real API's framing: `event:` then `data:`, the `type` inside naming the event.
    return _chunk(
        f"event: {name}\ndata: ".encode() + orjson.dumps({"type": name, **data}) + b"\n\n"
    )


ANTHROPIC_MODEL = "claude-bench"
ANTHROPIC_USAGE = {
    "input_tokens": 9,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
    "output_tokens": 1,
}
ANTHROPIC_MESSAGE: dict[str, object] = {
    "id": "msg_bench",
    "type": "message",
    "role": "assistant",
    "model": ANTHROPIC_MODEL,
    "content": [],
    "stop_reason": None,
    "stop_sequence": None,
    "usage": ANTHROPIC_USAGE,
}


def anthropic_stream(chunks: int) -> bytes:
    """A whole Messages stream of `chunks` text deltas, in the order tests/fake_anthropic.py
    and the real API send them: start, ping, one text block, the stop reason, the end."""
    deltas = (
        _anthropic_event(
            "content_block_delta", index=0, delta={"type": "text_delta", "text": f"tok{i} "}
        )
        for i in range(chunks)
    )
    return b"".join(
        (
            _anthropic_event("message_start", message=ANTHROPIC_MESSAGE),
            _anthropic_event("ping"),
            _anthropic_event(
                "content_block_start", index=0, content_block={"type": "text", "text": ""}
            ),
            *deltas,
            _anthropic_event("content_block_stop", index=0),
            _anthropic_event(
                "message_delta",
                delta={"stop_reason": "end_turn", "stop_sequence": None},
                usage={"output_tokens": chunks},
            ),
            _anthropic_event("message_stop"),
            b"0\r\n\r\n",
        )
    )


ANTHROPIC_COMPLETION = orjson.dumps(
    {
        **ANTHROPIC_MESSAGE,
        "content": [{"type": "text", "text": "Hello from the fast upstream."}],
        "stop_reason": "end_turn",
        "usage": {**ANTHROPIC_USAGE, "output_tokens": 6},
    }
)


class Settings:
    chunks = 20
    delay = False
    first_ms = 100.0
    gap_ms = 10.0
    tick_ms = 0.0
    pacer: Pacer | None = None
    anthropic_stream = b""  # with --anthropic: the whole stream, made once


class Pacer:
    """Writes the due chunk of every paced stream from one timer, `tick` apart, that runs
    while any stream is on: a stream is filed under the tick its next chunk is due in."""

    def __init__(self, settings: Settings, tick: float) -> None:
        self.settings = settings
        self.tick = tick
        self.due: defaultdict[int, list[UpstreamProtocol]] = defaultdict(list)
        self.done = 0  # the last tick whose streams were written
        self.running = False

    def add(self, stream: UpstreamProtocol, at: float) -> None:
        loop = asyncio.get_running_loop()
        if not self.running:
            self.running = True
            self.done = int(loop.time() / self.tick)
            loop.call_at((self.done + 1) * self.tick, self._run)
        self.due[max(int(at / self.tick), self.done + 1)].append(stream)

    def _run(self) -> None:
        loop = asyncio.get_running_loop()
        now = int(loop.time() / self.tick)
        gap = self.settings.gap_ms / 1000
        for slot in range(self.done + 1, now + 1):
            self.done = slot
            for stream in self.due.pop(slot, ()):
                if stream.write_next():
                    self.add(stream, slot * self.tick + gap)
        if self.due:
            loop.call_at((now + 1) * self.tick, self._run)
        else:
            self.running = False


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a delayed stream is being written; later requests wait
        self.stream_task: asyncio.Task[None] | None = None
        self.sent = 0  # chunks of the paced stream written so far

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._drain()

    def _drain(self) -> None:
        while not self.busy:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at)
                length = int(head[at + 15 : line_end if line_end > 0 else None])
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            self._respond(head[: head.find(b" http/")], body)

    def _respond(self, request_line: bytes, body: bytes) -> None:
        assert self.transport is not None
        if self.settings.anthropic_stream:
            if not request_line.startswith(b"post /v1/messages"):
                self.transport.write(NOT_FOUND)
            elif b'"stream":true' in body or b'"stream": true' in body:
                self.transport.write(STREAM_HEAD + self.settings.anthropic_stream)
            else:
                self.transport.write(_json_response(ANTHROPIC_COMPLETION))
        elif request_line.startswith(b"get /v1/models"):
            self.transport.write(_json_response(MODELS))
        elif request_line.startswith(b"post "):
            if b'"stream":true' in body or b'"stream": true' in body:
                if self.settings.pacer is not None:
                    self.busy = True
                    self.sent = 0
                    self.transport.write(STREAM_HEAD)
                    at = asyncio.get_running_loop().time() + self.settings.first_ms / 1000
                    self.settings.pacer.add(self, at)
                elif self.settings.delay:
                    self.busy = True
                    self.stream_task = asyncio.ensure_future(self._slow_stream())
                else:
                    events = b"".join(_event(i) for i in range(self.settings.chunks))
                    self.transport.write(STREAM_HEAD + events + STREAM_END)
            else:
                self.transport.write(_json_response(COMPLETION))
        else:
            self.transport.write(NOT_FOUND)

    def write_next(self) -> bool:
        """Write the paced stream's next chunk (or its end); whether more are to come."""
        assert self.transport is not None
        if self.transport.is_closing():
            return False
        if self.sent < self.settings.chunks:
            self.transport.write(_cached_event(self.sent))
            self.sent += 1
            return True
        self.transport.write(STREAM_END)
        self.busy = False
        self._drain()
        return False

    async def _slow_stream(self) -> None:
        assert self.transport is not None
        try:
            self.transport.write(STREAM_HEAD)
            await asyncio.sleep(self.settings.first_ms / 1000)
            for i in range(self.settings.chunks):
                if self.transport.is_closing():
                    return
                if i:
                    await asyncio.sleep(self.settings.gap_ms / 1000)
                self.transport.write(_event(i))
            self.transport.write(STREAM_END)
        finally:
            self.busy = False
            if not self.transport.is_closing():
                self._drain()


async def serve(host: str, port: int, settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(settings), host, port, reuse_address=True, backlog=4096
    )
    if settings.delay and settings.pacer is None and settings.tick_ms:
        settings.pacer = Pacer(settings, settings.tick_ms / 1000)
    print(f"fast upstream on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--delay", action="store_true")
    parser.add_argument("--first-ms", type=float, default=100.0)
    parser.add_argument("--gap-ms", type=float, default=10.0)
    parser.add_argument(
        "--paced",
        action="store_true",
        help="with --delay: one timer for all streams instead of one per stream",
    )
    parser.add_argument("--tick-ms", type=float, default=1.0, help="the --paced timer's period")
    parser.add_argument(
        "--anthropic",
        action="store_true",
        help="answer as Anthropic's Messages API (POST /v1/messages), not OpenAI's; no --delay",
    )
    args = parser.parse_args()
    if args.anthropic and args.delay:
        parser.error("--anthropic streams without --delay")
    settings = Settings()
    settings.chunks, settings.delay = args.chunks, args.delay
    settings.first_ms, settings.gap_ms = args.first_ms, args.gap_ms
    settings.tick_ms = args.tick_ms if args.paced else 0.0
    if args.anthropic:
        settings.anthropic_stream = anthropic_stream(args.chunks)
    uvloop.run(serve(args.host, args.port, settings))


if __name__ == "__main__":
    main()
