"""What the backends of cloud APIs in their own dialects share: a call sent in the
upstream's dialect over the OpenAI backend's pools, and its answer, stream or error turned
into the internal OpenAI one by the dialect's translators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..core.call import Call, Reply
from ..core.record import RequestRecord
from ..core.registry import Replica
from .openai_http import OpenAIHttpBackend


def object_of(value: Any) -> dict[str, Any]:
    """A JSON object, or an empty one for anything else (a field of the wrong shape)."""
    return value if isinstance(value, dict) else {}


class Chunks(Protocol):
    """A stream's translator: the upstream's bytes in, OpenAI chunks out."""

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes:
        """What the upstream's end brings (an unterminated last event, a held finish)."""
        ...


async def send_translated(
    http: OpenAIHttpBackend,
    call: Call,
    replica: Replica,
    record: RequestRecord,
    answer: Callable[[bytes], bytes],
    error: Callable[[int, bytes], bytes],
    chunks: Chunks,
) -> Reply:
    """The upstream's reply to `call` (already in its dialect), in the internal form."""
    reply = await http.send(call, replica, record)
    if reply.status >= 400:
        reply.body = error(reply.status, reply.body)
        reply.media_type = "application/json"
        reply.headers["Content-Type"] = "application/json"
        return reply
    if reply.stream is None:
        reply.body = answer(reply.body)
        return reply
    try:
        stream = TranslatedStream(reply, chunks)
        reply.body = await stream.first()
    except BaseException:
        reply.close()
        raise
    reply.stream = stream
    return reply


class TranslatedStream:
    """The rest of an upstream's stream, as OpenAI chunks: each read translated as it
    comes; a read that completes no event is skipped. Closing it closes the upstream."""

    def __init__(self, reply: Reply, chunks: Chunks) -> None:
        assert reply.stream is not None
        self.inner = reply.stream
        self.chunks = chunks
        self.ended = False
        self._opening = reply.body

    async def first(self) -> bytes:
        """The first chunks (the opening event gives one at once, so this rarely waits)."""
        out = self.chunks.feed(self._opening)
        return out or await self.next()

    async def next(self) -> bytes:
        while not self.ended:
            raw = await self.inner.next()
            out = self.chunks.feed(raw) if raw else b""
            if not raw or self.inner.ended:
                self.ended = True
                out += self.chunks.finish()
            if out:
                return out
        return b""

    def close(self) -> None:
        self.ended = True
        self.inner.close()
