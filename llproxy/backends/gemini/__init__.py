"""The backend for Google's Gemini API (generativelanguage.googleapis.com): the internal
chat call goes out as `generateContent` (or `streamGenerateContent?alt=sse`) over the same
per-worker pools as OpenAI servers, and its answer, stream or error comes back as the
internal OpenAI one, so every client dialect reaches these models. A Gemini client's own
request is passed on untranslated."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import orjson

from ...core.call import Call, JsonPayload, Reply, prompt_text
from ...core.record import RequestRecord
from ...core.registry import Model, Replica
from ..openai_http import OpenAIHttpBackend
from ..translated import chat_payload, object_of, send_translated
from .reply import ChatChunks, chat_answer, chat_error
from .request import to_gemini

BACKEND = "gemini"


class GeminiBackend:
    def __init__(self, http: OpenAIHttpBackend) -> None:
        self.http = http  # its pools, deadlines and failure handling serve this one too

    async def send(self, call: Call, replica: Replica, record: RequestRecord) -> Reply:
        payload = chat_payload(call, "a Gemini API")
        # The model is named in the path (the transport escapes what must be).
        method = "streamGenerateContent" if call.stream else "generateContent"
        query = "?alt=sse" if call.stream else ""
        path = f"v1beta/models/{replica.upstream_id}:{method}"
        native = payload.native
        if native is not None and native.dialect == BACKEND:
            # The client speaks Gemini too: its request goes on as it came, and the answer
            # comes back as Gemini's (the client's dialect passes it on).
            passed = Call(
                path, call.model, GeminiPayload(native.body), call.stream, call.via, query=query
            )
            reply = await self.http.send(passed, replica, record)
            record.answered_in = BACKEND
            return reply
        body = to_gemini(payload.body)
        translated = Call(path, call.model, GeminiPayload(body), call.stream, call.via, query=query)
        answer = partial(chat_answer, model=replica.upstream_id)
        return await send_translated(
            self.http,
            translated,
            replica,
            record,
            answer,
            chat_error,
            ChatChunks(replica.upstream_id),
        )

    async def count_tokens(self, model: Model, chat: Mapping[str, Any]) -> int | None:
        """Gemini's own count (`countTokens`) of the chat's prompt text."""
        replica = model.replicas[0]
        text = prompt_text(chat)
        path = f"v1beta/models/{replica.upstream_id}:countTokens"
        body = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
        counted = object_of(await self.http.ask(replica.upstream, path, body)).get("totalTokens")
        return counted if isinstance(counted, int) else None


class GeminiPayload(JsonPayload):
    """A Gemini body: the model is named in the path, not in the body."""

    def encode(self, model_id: str) -> bytes:
        return orjson.dumps(self.body)
