"""The one module that writes answers to clients: whole answers, streams, and what every
answer carries (the gateway's headers; `Connection: close` from a retiring worker).

A stream is sent as its model produces it: its headers leave with the first chunk, its
last chunk with its end, and when it fails after it started the client gets the dialect's
error event and a clean end. Leaving a stream any way but its end closes the model's
answer, so the model stops generating.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Mapping

from aiohttp import web

from ..core.answer import as_stream
from ..core.call import RETRY_HEADERS, Reply, Stream
from ..core.errors import FINAL_STATUSES, NO_RETRY, ProxyError, UpstreamFailed
from ..core.record import RequestRecord
from ..core.values import request_value
from ..dialects import Answer, StreamTransform, Translation
from .chunked import ChunkFrames

_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@request_value
class Delivery:
    """What every answer to one request carries, decided by the gateway."""

    headers: Mapping[str, str]  # security, CORS and rate-limit headers
    close: bool = False  # the worker is retiring: the client must not reuse the connection
    # Seconds of silence after which a stream whose dialect has a keepalive sends one (and
    # a stream that has not started yet is opened to send it).
    keepalive: float = 10.0


def answer_response(answer: Answer) -> web.Response:
    """The response of a whole answer: every answer, llproxy's own errors and relayed ones
    alike, passes here, so here is where a final one says not to retry it."""
    # A relayed Content-Type (with its parameters) wins over the bare media type.
    headers = {"Content-Type": answer.media_type, **answer.headers}
    if answer.status in FINAL_STATUSES:
        headers |= NO_RETRY
    return web.Response(status=answer.status, body=answer.body, headers=headers)


def upstream_error_response(translation: Translation, reply: Reply) -> web.Response:
    """An error the model's server answered, in the client's shape, with its advice on
    when to retry (`retry-after`, `retry-after-ms`) passed on."""
    answer = translation.upstream_error(reply)
    advice = {name: reply.headers[name] for name in RETRY_HEADERS if name in reply.headers}
    if advice:
        answer = dataclasses.replace(answer, headers={**answer.headers, **advice})
    return answer_response(answer)


async def finish(request: web.Request, response: web.StreamResponse, delivery: Delivery) -> None:
    """Send an answer that is not sent yet, with what every answer carries, to its end."""
    if not response.prepared:  # else a stream, sent with them
        response.headers.update(delivery.headers)
        if delivery.close:
            response.force_close()
        await response.prepare(request)
    await response.write_eof()


class EventStream(web.StreamResponse):
    """A streamed response whose headers leave with its first chunk, in one send.

    It is prepared only once the model's first chunk is here, so nothing waits on the
    headers; sent apart they cost a second send and a wake-up of the client (~0.4 ms to
    the first token, measured). aiohttp's plain Response buffers its headers the same way.
    """

    _send_headers_immediately = False


async def stream_early(
    request: web.Request,
    sending: Awaitable[Reply],
    translation: Translation,
    record: RequestRecord,
    delivery: Delivery,
) -> web.StreamResponse:
    """A stream whose client is kept waiting at most `delivery.keepalive` seconds: when
    the model is still silent then (a long prefill, a queue), the stream opens and
    keepalives follow until the first chunk. Past that point a failure is an error
    event, not a status."""
    opened: list[tuple[ClientStream, asyncio.Future[None]]] = []

    def open_now() -> None:
        transform = translation.stream_transform(record, None)
        client = ClientStream(request, transform, delivery, record)
        opened.append((client, asyncio.ensure_future(client.open(200, {}, announce=True))))

    # A timer, not a task beside every request: most models answer before it fires.
    timer = asyncio.get_running_loop().call_later(delivery.keepalive, open_now)
    try:
        reply = await sending
    except ProxyError as error:
        if not opened:
            raise  # nothing sent yet: the error is a status
        client, opening = opened[0]
        await opening
        await client.end(client.transform.fail(error))
        return client.response
    except BaseException:
        for _, opening in opened:
            opening.cancel()
        raise
    finally:
        timer.cancel()
    if not opened:
        return await answer_or_stream(request, reply, translation, record, delivery)
    client, opening = opened[0]
    try:
        await opening
        transform = client.transform
        if reply.status >= 400:
            answer = translation.upstream_error(reply)
            await client.end(transform.fail(UpstreamFailed(answer.status, reply.body)))
        elif reply.stream is None:  # a whole answer to a stream request: one chunk
            try:
                last = transform.feed(as_stream(reply, translation.target)) + transform.finish()
            except ProxyError as error:
                last = transform.fail(error)
            await client.end(last)
        else:
            await client.relay(reply)
    finally:
        reply.close()
    return client.response


async def answer_or_stream(
    request: web.Request,
    reply: Reply,
    translation: Translation,
    record: RequestRecord,
    delivery: Delivery,
) -> web.StreamResponse:
    """An error, a stream, or a whole answer to a stream request as a stream."""
    try:
        if reply.status >= 400:
            return upstream_error_response(translation, reply)
        # A whole answer to a stream request is its one chunk; a malformed one is still
        # a status here, nothing is sent yet.
        whole = as_stream(reply, translation.target) if reply.stream is None else None
        transform = translation.stream_transform(record, reply)
        client = ClientStream(request, transform, delivery, record)
        await client.open(reply.status, reply.headers, at_once=reply.awaited)
        if whole is not None:
            await client.end(transform.feed(whole) + transform.finish())
        else:
            await client.relay(reply)
        return client.response
    finally:
        reply.close()


class ClientStream:
    """One streamed answer to a client: opened with its headers (which leave with the
    first bytes), fed chunk by chunk, kept alive through silences when its dialect has a
    keepalive, and ended once."""

    def __init__(
        self,
        request: web.Request,
        transform: StreamTransform,
        delivery: Delivery,
        record: RequestRecord,
    ) -> None:
        self.request = request
        self.loop = asyncio.get_running_loop()  # once: a getpid() system call on 3.11
        # For the wire capture (None: not kept): what was sent, what the upstream sent.
        self.kept = record.response_chunks
        self.upstream_kept = record.upstream_chunks
        self.transform = transform
        self.delivery = delivery
        self.response = EventStream()
        # Set after the first write (which carries the headers): the chunks' short path.
        self.frames: ChunkFrames | None = None
        self.last_write = 0.0
        # One timer per stream, not a task: most streams never need a keepalive, and a
        # task each cost ~15 µs a stream (measured). A ping is written only when due.
        self._timer: asyncio.TimerHandle | None = None
        self._ping: asyncio.Future[None] | None = None

    async def open(
        self,
        status: int,
        relayed: Mapping[str, str],
        announce: bool = False,
        at_once: bool = False,
    ) -> None:
        """Headers set; with `announce`, they go now with the transform's opening (a model
        still silent); with `at_once` they go now alone (a person will answer); else both
        leave with the first chunk's translation, in one send (a translated stream's own
        opening alone cost a send and a wake-up, measured)."""
        response = self.response
        response._send_headers_immediately = at_once
        response.set_status(status)
        response.headers.update(
            {
                "Content-Type": self.transform.media_type,
                **_STREAM_HEADERS,
                **{k: v for k, v in relayed.items() if k != "Content-Type"},
                **self.delivery.headers,
            }
        )
        if self.delivery.close:
            response.force_close()
        await response.prepare(self.request)
        if announce:
            await self.write(self.transform.start())
        if self.transform.keepalive():
            self._timer = self.loop.call_later(self.delivery.keepalive, self._due)

    async def write(self, data: bytes) -> None:
        self.last_write = self.loop.time()
        if self.kept is not None:
            self.kept.append(data)
        if self.frames is not None:
            if self.frames.write(data):
                await self.frames.drain()
            return
        await self.response.write(data)
        self.frames = ChunkFrames.of(self.response)

    async def relay(self, reply: Reply) -> None:
        """The reply's chunks through the transform, as they come, to the stream's end."""
        assert reply.stream is not None
        source: Stream = reply.stream
        transform = self.transform
        last = b""  # what the stream's end carries
        try:
            chunk = reply.body
            while chunk:
                relay = transform.feed(chunk)
                if source.ended:
                    # The model's end came with this chunk: both leave with the stream's
                    # end, in one send (~30% fewer packets per streamed request, measured).
                    last = relay
                    break
                if relay:
                    await self.write(relay)
                chunk = await source.next()
                if self.upstream_kept is not None:
                    self.upstream_kept.append(chunk)
            last += transform.finish()
        except ProxyError as error:
            last += transform.fail(error)
        await self.end(last)

    async def end(self, last: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ping is not None:
            self._ping.cancel()
        if self.kept is not None:
            self.kept.append(last)
        await self.response.write_eof(last)

    def _due(self) -> None:
        """A keepalive after a whole period of silence; then the timer is set again."""
        loop = self.loop
        every = self.delivery.keepalive
        silent = loop.time() - self.last_write
        if silent >= every and (self._ping is None or self._ping.done()):
            self._ping = asyncio.ensure_future(self.write(self.transform.keepalive()))
            # A client gone meanwhile is the relay's to notice: the ping's error is read here.
            self._ping.add_done_callback(lambda ping: ping.cancelled() or ping.exception())
            silent = 0.0
        self._timer = loop.call_later(every - silent, self._due)
