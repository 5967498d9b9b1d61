"""Many concurrent streaming clients in one process, for the capacity bench.

Each client opens its own connection (starts spread evenly over --spread seconds), POSTs
one streamed request and notes when each token arrives (the fake upstream's tokens are
`tok<n> `; a proxy may put several that came together in one event). A bare uvloop
protocol that only counts tokens, so thousands of streams cost the client little. Prints
one JSON object: time to first chunk per stream, a histogram of the gaps between chunks
(tenths of a millisecond), and the errors by kind.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import time
from collections import Counter
from typing import Any

import uvloop

TOKEN = re.compile(rb"tok\d+ ")
# What ends a stream properly, in each dialect.
ENDS = {"openai": b"data: [DONE]", "anthropic": b"event: message_stop"}


class StreamClient(asyncio.Protocol):
    def __init__(self, request: bytes, end: bytes, done: asyncio.Future[None]):
        self.request = request
        self.end = end
        self.done = done
        self.started = 0.0
        self.arrivals: list[float] = []
        self.head = b""
        self.in_body = False
        self.tail = b""  # the end of the last read: a token may be cut across two
        self.ended = False
        self.error: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.started = time.perf_counter()
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith(b"HTTP/1.1 200"):
                self.error = "status " + self.head[9:12].decode(errors="replace")
                return
            self.in_body = True
            data = self.head[end + 4 :]
        text = self.tail + data
        count = len(TOKEN.findall(text)) - len(TOKEN.findall(self.tail))
        self.arrivals.extend([now] * count)
        self.tail = text[-32:]
        if self.end in text:
            self.ended = True
            if not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None and not self.ended:
            self.error = type(exc).__name__ if exc else "closed before the end"
        if not self.done.done():
            self.done.set_result(None)


async def one(
    port: int, request: bytes, dialect: str, delay: float, timeout: float
) -> StreamClient:
    await asyncio.sleep(delay)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    client = StreamClient(request, ENDS[dialect], done)
    try:
        transport, _ = await loop.create_connection(lambda: client, "127.0.0.1", port)
    except OSError as exc:
        client.error = f"connect: {type(exc).__name__}"
        return client
    try:
        await asyncio.wait_for(done, timeout)
    except TimeoutError:
        client.error = "timeout"
    transport.close()
    return client


async def run(args: argparse.Namespace) -> dict[str, Any]:
    body = args.body.encode()
    request = (
        f"POST {args.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"anthropic-version: 2023-06-01\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    clients = await asyncio.gather(
        *(
            one(args.port, request, args.dialect, args.spread * i / args.count, args.timeout)
            for i in range(args.count)
        )
    )
    gaps: Counter[int] = Counter()
    ttfc: list[float] = []
    errors: Counter[str] = Counter()
    for client in clients:
        if client.error is None and len(client.arrivals) != args.chunks:
            client.error = f"{len(client.arrivals)} chunks"
        if client.error is not None:
            errors[client.error] += 1
            continue
        ttfc.append((client.arrivals[0] - client.started) * 1000)
        arrivals = client.arrivals
        gaps.update(round((b - a) * 10_000) for a, b in itertools.pairwise(arrivals))
    return {"ttfc_ms": ttfc, "gaps": dict(gaps), "errors": dict(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--body", required=True, help="the JSON request body")
    parser.add_argument("--dialect", choices=sorted(ENDS), default="openai")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--chunks", type=int, required=True, help="token chunks per stream")
    parser.add_argument("--spread", type=float, default=1.0, help="seconds to start them in")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per stream")
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
