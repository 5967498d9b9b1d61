"""What the backends of cloud APIs in their own dialects share: a call sent in the
upstream's dialect over the OpenAI backend's pools, and its answer, stream or error turned
into the internal OpenAI one by the dialect's translators."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import orjson

from ..core.call import Call, JsonPayload, Reply
from ..core.errors import InvalidRequest
from ..core.record import RequestRecord
from ..core.registry import Replica
from ..core.sse import EventSplitter, event_document
from .openai_http import OpenAIHttpBackend


def object_of(value: Any) -> dict[str, Any]:
    """A JSON object, or an empty one for anything else (a field of the wrong shape)."""
    return value if isinstance(value, dict) else {}


def chat_payload(call: Call, api: str) -> JsonPayload:
    """The chat body of a call to a cloud API in its own dialect: those APIs answer chat
    only, so any other route is the client's 400 before anything is sent."""
    if call.route != "chat/completions" or not isinstance(call.payload, JsonPayload):
        raise InvalidRequest(f"'{call.model}' is served by {api}, which answers chat only")
    return call.payload


def chat_messages(chat: Mapping[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    """A chat body's messages with their places, each checked to be an object (a 400
    naming it if not)."""
    messages = chat.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be a list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        yield i, message


def content_text(content: Any) -> str:
    """An OpenAI message's content as plain text: a string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def append_turn(turns: list[dict[str, Any]], role: str, key: str, items: list[Any]) -> None:
    """Add a turn's items (Anthropic's content blocks, Gemini's parts) to the conversation:
    both APIs want turns of one role merged, where OpenAI's messages may repeat a role."""
    if not items:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1][key] += items
    else:
        turns.append({"role": role, key: items})


class Chunks(Protocol):
    """A stream's translator: the upstream's bytes in, OpenAI chunks out."""

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes:
        """What the upstream's end brings (an unterminated last event, a held finish)."""
        ...


class EventChunks:
    """The part of a stream's translator both cloud dialects share: the upstream's SSE
    events split and decoded, each object handed to `event`, nothing after the end."""

    def __init__(self, model: str = "") -> None:
        self.events = EventSplitter()
        self.ended = False
        # What every chunk names: the upstream's message id and model, once it says them.
        self.id = ""
        self.model = model
        self.created = int(time.time())

    def chunk(self, delta: dict[str, Any], **choice: Any) -> bytes:
        """An OpenAI chunk of one choice: its delta, and `finish_reason` when it ends."""
        return self.data(
            {"choices": [{"index": 0, "delta": delta, "finish_reason": None} | choice]}
        )

    def data(self, fields: dict[str, Any]) -> bytes:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            **fields,
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def event(self, document: dict[str, Any]) -> bytes:
        """The OpenAI chunks one upstream event becomes."""
        raise NotImplementedError

    def feed(self, data: bytes) -> bytes:
        out = []
        for event in self.events.bodies(data):
            if self.ended:
                break
            document = event_document(event)
            if isinstance(document, dict):
                out.append(self.event(document))
        return b"".join(out)

    def finish(self) -> bytes:
        """What ends a stream the upstream closed: its last event, if unterminated."""
        return self.feed_rest()

    def feed_rest(self) -> bytes:
        """The upstream's last event, when its stream ended without terminating it."""
        rest = self.events.rest()
        return self.feed(rest + b"\n\n") if rest.strip() else b""


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
