"""A fake Gemini API (generativelanguage.googleapis.com), written from the public protocol
and the `google-genai` SDK's shapes (checked with that SDK before it judges llproxy): it
knows nothing of llproxy's translators.

What it answers depends on a marker in the last user text: `[tool]` asks for a function
call (answered in text once a functionResponse comes back), `[think]` thinks first,
`[429]` and `[503]` fail with those statuses, `[midfail]` fails after the stream started,
`[slow]` streams slowly (a client leaving is seen as `disconnected`). Every answer's
usage is USAGE; `answers` keeps the bytes of every answer sent.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

KEY = "AIza-fake-0123456789"
USAGE = {
    "promptTokenCount": 13,
    "candidatesTokenCount": 6,
    "thoughtsTokenCount": 4,
    "totalTokenCount": 23,
}
TEXT = ["Hello", " from", " Gemini."]
COUNTED = 42  # every countTokens answer
THOUGHT = "Thinking it over."
MODELS = [
    {
        "name": "models/gemini-fake-flash",
        "displayName": "Gemini Fake Flash",
        "inputTokenLimit": 1048576,
        "outputTokenLimit": 65536,
        "supportedGenerationMethods": ["generateContent", "countTokens"],
    },
    {
        "name": "models/gemini-fake-embedding",
        "inputTokenLimit": 2048,
        "supportedGenerationMethods": ["embedContent"],
    },
    {
        "name": "models/gemini-fake-pro",
        "inputTokenLimit": 2097152,
        "outputTokenLimit": 8192,
        "supportedGenerationMethods": ["generateContent"],
    },
]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None


@dataclass
class FakeGemini:
    key: str = KEY
    delay: float = 0.005
    received: list[Received] = field(default_factory=list)
    answers: list[bytearray] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def start(self) -> None:
        app = web.Application()
        for version in ("v1beta", "v1"):
            app.router.add_get(f"/{version}/models", self.models)
            app.router.add_post(f"/{version}/models/{{tail:.+}}", self.call)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    @staticmethod
    def error(code: int, status: str, message: str, **headers: str) -> web.Response:
        body = {"error": {"code": code, "message": message, "status": status}}
        return web.json_response(body, status=code, headers=headers)

    def refused(self, request: web.Request) -> web.Response | None:
        if self.key not in (request.headers.get("x-goog-api-key"), request.query.get("key")):
            return self.error(
                403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers."
            )
        return None

    async def models(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path_qs, dict(request.headers), None))
        if (refused := self.refused(request)) is not None:
            return refused
        size = int(request.query.get("pageSize", "50"))
        start = int(request.query.get("pageToken") or "0")
        body: dict[str, Any] = {"models": MODELS[start : start + size]}
        if start + size < len(MODELS):
            body["nextPageToken"] = str(start + size)
        return web.json_response(body)

    async def call(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.received.append(Received(request.path_qs, dict(request.headers), body))
        if (refused := self.refused(request)) is not None:
            return refused
        model, _, method = request.match_info["tail"].rpartition(":")
        if method == "countTokens":
            return web.json_response({"totalTokens": COUNTED})
        if method not in ("generateContent", "streamGenerateContent"):
            return self.error(404, "NOT_FOUND", f"unknown method {method}")
        if not isinstance(body.get("contents"), list) or not body["contents"]:
            return self.error(400, "INVALID_ARGUMENT", "* contents: must not be empty")
        marker = _last_user_text(body)
        if "[429]" in marker:
            return self.error(
                429, "RESOURCE_EXHAUSTED", "Resource has been exhausted", **{"retry-after": "7"}
            )
        if "[503]" in marker:
            return self.error(503, "UNAVAILABLE", "The model is overloaded.")
        parts = self.parts(body, marker)
        answer = {
            "candidates": [
                {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}
            ],
            "usageMetadata": USAGE,
            "modelVersion": model.removeprefix("models/"),
            "responseId": secrets.token_hex(6),
        }
        if method == "generateContent":
            raw = orjson.dumps(answer)
            self.answers.append(bytearray(raw))
            return web.Response(body=raw, content_type="application/json")
        if request.query.get("alt") != "sse":
            return self.error(400, "INVALID_ARGUMENT", "this fake streams with alt=sse only")
        return await self.stream(request, answer, marker)

    def parts(self, body: dict[str, Any], marker: str) -> list[dict[str, Any]]:
        last = body["contents"][-1]
        responses = [
            p["functionResponse"] for p in last.get("parts", ()) if "functionResponse" in p
        ]
        if responses:
            said = responses[0].get("response", {})
            return [{"text": f"The weather: {said.get('result', said)}"}]
        out: list[dict[str, Any]] = []
        if "[think]" in marker:
            out.append({"text": THOUGHT, "thought": True})
        out.append({"text": "".join(TEXT)})
        if "[tool]" in marker:
            out.append(
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                    "thoughtSignature": "c2lnLWZha2U=",
                }
            )
        return out

    async def stream(
        self, request: web.Request, answer: dict[str, Any], marker: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        sent = bytearray()
        self.answers.append(sent)
        delay = 0.5 if "[slow]" in marker else self.delay

        async def frame(parts: list[dict[str, Any]], last: bool = False) -> None:
            candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
            if last:
                candidate["finishReason"] = "STOP"
            usage = USAGE if last else {"promptTokenCount": USAGE["promptTokenCount"]}
            document = {
                "candidates": [candidate],
                "usageMetadata": usage,
                "modelVersion": answer["modelVersion"],
                "responseId": answer["responseId"],
            }
            data = b"data: " + orjson.dumps(document) + b"\r\n\r\n"
            sent.extend(data)
            await response.write(data)
            await asyncio.sleep(delay)

        parts = answer["candidates"][0]["content"]["parts"]
        try:
            for part in parts:
                if "functionCall" in part:
                    continue
                if part["text"] == "".join(TEXT):
                    pieces = TEXT * (40 if "[slow]" in marker else 1)
                    for i, piece in enumerate(pieces):
                        await frame([{"text": piece}])
                        if "[midfail]" in marker and i == 1:
                            error = {
                                "code": 503,
                                "message": "The model is overloaded.",
                                "status": "UNAVAILABLE",
                            }
                            data = b"data: " + orjson.dumps({"error": error}) + b"\r\n\r\n"
                            sent.extend(data)
                            await response.write(data)
                            return response
                else:
                    await frame([part])
            calls = [part for part in parts if "functionCall" in part]
            await frame(calls, last=True)
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response


def _last_user_text(body: dict[str, Any]) -> str:
    users = [c for c in body["contents"] if c.get("role", "user") == "user"]
    parts = users[-1].get("parts", ()) if users else ()
    return " ".join(p.get("text", "") for p in parts if isinstance(p, dict))
