"""A fake Anthropic Messages API, written from the public protocol (and checked with the
official `anthropic` SDK before it judges llproxy): it knows nothing of llproxy's
translators.

What it answers depends on a marker in the last user text: `[tool]` asks for a tool call
(answered in text once a tool_result comes back), `[think]` thinks first, `[429]` and
`[529]` fail with those statuses, `[midfail]` fails after the stream started, `[late]`
sends its first event after 0.6 s, `[slow]` streams slowly (a client leaving is seen as
`disconnected`). Every answer's usage is USAGE, so a test can compare a usage record with
the back-end's own numbers; `answers` keeps the bytes of every answer sent.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

KEY = "sk-ant-fake-0123456789"
USAGE = {
    "input_tokens": 11,
    "cache_creation_input_tokens": 3,
    "cache_read_input_tokens": 5,
    "output_tokens": 7,
}
TEXT = ["Hello", " from", " Claude."]
COUNTED = 42  # every count_tokens answer
THOUGHT = ["Let me ", "think."]
MODELS = [
    {
        "id": "claude-fake-large",
        "display_name": "Claude Fake Large",
        "max_input_tokens": 200000,
        "max_tokens": 64000,
    },
    {
        "id": "claude-fake-small",
        "display_name": "Claude Fake Small",
        "max_input_tokens": 100000,
        "max_tokens": 8192,
    },
]
TOOL_INPUT_PARTS = ['{"ci', 'ty": "Pa', 'ris"}']


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    raw: bytes = b""


@dataclass
class FakeAnthropic:
    key: str = KEY
    delay: float = 0.005
    received: list[Received] = field(default_factory=list)
    answers: list[bytearray] = field(default_factory=list)  # the bytes of each answer sent
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_get("/v1/models", self.models)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    # --- helpers ---------------------------------------------------------------------

    @staticmethod
    def error(status: int, kind: str, message: str, **headers: str) -> web.Response:
        body = {"type": "error", "error": {"type": kind, "message": message}}
        return web.json_response(body, status=status, headers={"request-id": "req_fake", **headers})

    def refused(self, request: web.Request) -> web.Response | None:
        # The key comes in x-api-key, or (as the SDK sends it since 2026) as a Bearer token.
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.key not in (request.headers.get("x-api-key"), bearer):
            return self.error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return self.error(400, "invalid_request_error", "anthropic-version: header is required")
        return None

    async def models(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path_qs, dict(request.headers), None))
        if (refused := self.refused(request)) is not None:
            return refused
        limit = int(request.query.get("limit", "20"))
        after = request.query.get("after_id")
        start = next((i + 1 for i, m in enumerate(MODELS) if m["id"] == after), 0)
        page = [
            {"type": "model", "created_at": "2025-05-14T00:00:00Z", **m}
            for m in MODELS[start : start + limit]
        ]
        more = start + limit < len(MODELS)
        body = {
            "data": page,
            "has_more": more,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
        }
        return web.json_response(body)

    async def count_tokens(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.received.append(Received(request.path, dict(request.headers), body))
        if (refused := self.refused(request)) is not None:
            return refused
        return web.json_response({"input_tokens": COUNTED})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = orjson.loads(raw)
        self.received.append(Received(request.path, dict(request.headers), body, raw))
        if (refused := self.refused(request)) is not None:
            return refused
        if not isinstance(body.get("max_tokens"), int):
            return self.error(400, "invalid_request_error", "max_tokens: Field required")
        marker = _last_user_text(body)
        if "[429]" in marker:
            return self.error(
                429,
                "rate_limit_error",
                "Number of requests has exceeded your rate limit",
                **{"retry-after": "7"},
            )
        if "[529]" in marker:
            return self.error(529, "overloaded_error", "Overloaded")
        blocks = self.blocks(body, marker)
        stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        message = {
            "id": "msg_" + secrets.token_hex(8),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": blocks,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": USAGE,
        }
        if body.get("stream") is not True:
            raw = orjson.dumps(message)
            self.answers.append(bytearray(raw))
            return web.Response(
                body=raw, content_type="application/json", headers={"request-id": "req_fake"}
            )
        return await self.stream(request, message, marker)

    def blocks(self, body: dict[str, Any], marker: str) -> list[dict[str, Any]]:
        results = [b for b in _last_user_blocks(body) if b.get("type") == "tool_result"]
        if results:
            content = results[0].get("content")
            said = (
                content
                if isinstance(content, str)
                else "".join(b.get("text", "") for b in content or ())
            )
            return [{"type": "text", "text": f"The weather: {said}"}]
        out: list[dict[str, Any]] = []
        if "[think]" in marker:
            out.append({"type": "thinking", "thinking": "".join(THOUGHT), "signature": "sig-fake"})
        out.append({"type": "text", "text": "".join(TEXT)})
        if "[tool]" in marker:
            out.append(
                {
                    "type": "tool_use",
                    "id": "toolu_" + secrets.token_hex(6),
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            )
        return out

    async def stream(
        self, request: web.Request, message: dict[str, Any], marker: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "request-id": "req_fake"}
        )
        if "[late]" in marker:  # a long prefill: nothing for a while
            await asyncio.sleep(0.6)
        await response.prepare(request)
        delay = 0.5 if "[slow]" in marker else self.delay

        sent = bytearray()
        self.answers.append(sent)

        async def send(name: str, data: dict[str, Any]) -> None:
            event = (
                b"event: "
                + name.encode()
                + b"\ndata: "
                + orjson.dumps({"type": name, **data})
                + b"\n\n"
            )
            sent.extend(event)
            await response.write(event)
            await asyncio.sleep(delay)

        start_usage = {**USAGE, "output_tokens": 1}
        try:
            await send(
                "message_start",
                {"message": {**message, "content": [], "stop_reason": None, "usage": start_usage}},
            )
            await send("ping", {})
            for index, block in enumerate(message["content"]):
                if block["type"] == "text":
                    await send(
                        "content_block_start",
                        {"index": index, "content_block": {"type": "text", "text": ""}},
                    )
                    pieces = (
                        TEXT * (40 if "[slow]" in marker else 1)
                        if block["text"] == "".join(TEXT)
                        else [block["text"]]
                    )
                    for i, piece in enumerate(pieces):
                        await send(
                            "content_block_delta",
                            {"index": index, "delta": {"type": "text_delta", "text": piece}},
                        )
                        if "[midfail]" in marker and i == 1:
                            await send(
                                "error",
                                {"error": {"type": "overloaded_error", "message": "Overloaded"}},
                            )
                            return response
                elif block["type"] == "thinking":
                    await send(
                        "content_block_start",
                        {
                            "index": index,
                            "content_block": {"type": "thinking", "thinking": "", "signature": ""},
                        },
                    )
                    for piece in THOUGHT:
                        await send(
                            "content_block_delta",
                            {
                                "index": index,
                                "delta": {"type": "thinking_delta", "thinking": piece},
                            },
                        )
                    await send(
                        "content_block_delta",
                        {
                            "index": index,
                            "delta": {"type": "signature_delta", "signature": "sig-fake"},
                        },
                    )
                else:
                    await send(
                        "content_block_start",
                        {"index": index, "content_block": {**block, "input": {}}},
                    )
                    for piece in TOOL_INPUT_PARTS:
                        await send(
                            "content_block_delta",
                            {
                                "index": index,
                                "delta": {"type": "input_json_delta", "partial_json": piece},
                            },
                        )
                await send("content_block_stop", {"index": index})
            await send(
                "message_delta",
                {
                    "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                    "usage": {"output_tokens": USAGE["output_tokens"]},
                },
            )
            await send("message_stop", {})
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response


def _last_user_blocks(body: dict[str, Any]) -> list[dict[str, Any]]:
    users = [m for m in body.get("messages") or () if m.get("role") == "user"]
    if not users:
        return []
    content = users[-1].get("content")
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _last_user_text(body: dict[str, Any]) -> str:
    return " ".join(b.get("text", "") for b in _last_user_blocks(body) if b.get("type") == "text")
