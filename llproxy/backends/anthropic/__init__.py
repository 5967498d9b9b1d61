"""The backend for Anthropic's Messages API (api.anthropic.com, or a server speaking it):
the internal chat call goes out as a Messages request over the same per-worker pools as
OpenAI servers, and its answer, stream or error comes back as the internal OpenAI one,
so every client dialect reaches these models unchanged. An Anthropic client's own request
is passed on untranslated (its anthropic-version and anthropic-beta with it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...core.call import Call, JsonPayload, Reply, prompt_text
from ...core.record import RequestRecord
from ...core.registry import Model, Replica
from ..openai_http import OpenAIHttpBackend
from ..translated import chat_payload, object_of, send_translated
from .reply import ChatChunks, chat_answer, chat_error
from .request import to_messages

BACKEND = "anthropic"
MESSAGES = "v1/messages"  # below the server's root, its base URL
COUNT = "v1/messages/count_tokens"


class AnthropicBackend:
    def __init__(self, http: OpenAIHttpBackend) -> None:
        self.http = http  # its pools, deadlines and failure handling serve this one too

    async def send(self, call: Call, replica: Replica, record: RequestRecord) -> Reply:
        payload = chat_payload(call, "an Anthropic API")
        native = payload.native
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
        body = to_messages(payload.body, replica.upstream_id)
        translated = Call(MESSAGES, call.model, JsonPayload(body), call.stream, call.via)
        return await send_translated(
            self.http, translated, replica, record, chat_answer, chat_error, ChatChunks()
        )

    async def count_tokens(self, model: Model, chat: Mapping[str, Any]) -> int | None:
        """Anthropic's own count of the chat's prompt text, as one user message."""
        replica = model.replicas[0]
        text = prompt_text(chat)
        body = {"model": replica.upstream_id, "messages": [{"role": "user", "content": text}]}
        counted = object_of(await self.http.ask(replica.upstream, COUNT, body)).get("input_tokens")
        return counted if isinstance(counted, int) else None
