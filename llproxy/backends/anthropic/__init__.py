"""The backend for Anthropic's Messages API (api.anthropic.com, or a server speaking it):
the internal chat call goes out as a Messages request over the same per-worker pools as
OpenAI servers, and its answer, stream or error comes back as the internal OpenAI one,
so every client dialect reaches these models unchanged. An Anthropic client's own request
is passed on untranslated (its anthropic-version and anthropic-beta with it)."""

from __future__ import annotations

from ...core.call import Call, JsonPayload, Reply
from ...core.errors import InvalidRequest
from ...core.record import RequestRecord
from ...core.registry import Replica
from ..openai_http import OpenAIHttpBackend
from .reply import ChatChunks, chat_answer, chat_error
from .request import to_messages

BACKEND = "anthropic"
MESSAGES = "v1/messages"  # below the server's root, its base URL


class AnthropicBackend:
    def __init__(self, http: OpenAIHttpBackend) -> None:
        self.http = http  # its pools, deadlines and failure handling serve this one too

    async def send(self, call: Call, replica: Replica, record: RequestRecord) -> Reply:
        if call.route != "chat/completions" or not isinstance(call.payload, JsonPayload):
            raise InvalidRequest(
                f"'{call.model}' is served by an Anthropic API, which answers chat only"
            )
        native = call.payload.native
        if native is not None and native.dialect == BACKEND:
            # The client speaks Anthropic too: its request goes on as it came, and the
            # answer comes back as Anthropic's (the client's dialect passes it on).
            passed = Call(
                MESSAGES,
                call.model,
                JsonPayload(native.body),
                call.stream,
                call.via,
                native.headers,
            )
            reply = await self.http.send(passed, replica, record)
            record.answered_in = BACKEND
            return reply
        body = to_messages(call.payload.body, replica.upstream_id)
        translated = Call(MESSAGES, call.model, JsonPayload(body), call.stream, call.via)
        reply = await self.http.send(translated, replica, record)
        if reply.status >= 400:
            reply.body = chat_error(reply.status, reply.body)
            reply.media_type = "application/json"
            reply.headers["Content-Type"] = "application/json"
            return reply
        if reply.stream is None:
            reply.body = chat_answer(reply.body)
            return reply
        try:
            stream = MessagesStream(reply, ChatChunks())
            reply.body = await stream.first()
        except BaseException:
            reply.close()
            raise
        reply.stream = stream
        return reply


class MessagesStream:
    """The rest of an Anthropic stream, as OpenAI chunks: each read of the upstream is
    translated as it comes; a read that completes no event is skipped."""

    def __init__(self, reply: Reply, chunks: ChatChunks) -> None:
        assert reply.stream is not None
        self.inner = reply.stream
        self.chunks = chunks
        self.ended = False
        self._opening = reply.body

    async def first(self) -> bytes:
        """The first chunks (message_start gives one at once, so this rarely waits)."""
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
