"""A fake OpenAI-compatible server for tests: real HTTP on loopback, with knobs.

Knobs (attributes of FakeUpstream, changeable while it runs): delay before headers and
before the model listing, number of stream chunks and the gap between them, a failure
status, hang forever, die after N chunks. It records every request it received and
notices when a client hangs up.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeUpstream:
    model_ids: list[str] = field(default_factory=lambda: ["fake-model"])
    loaded_model: str | None = None  # tabbyAPI: answer GET /v1/model with this id
    first_byte_delay: float = 0.0
    chunks: int = 5
    chunk_delay: float = 0.0
    fail_status: int | None = None
    fail_body: bytes | None = None
    hang: bool = False
    die_after_chunks: int | None = None
    report_usage: bool = True  # some servers never send `usage`
    # The usage chunk's choices: `[]` (vLLM, llama.cpp) or LiteLLM's one empty delta.
    usage_chunk_choices: list[Any] = field(default_factory=list)
    name: str = "fake"
    require_key: str | None = None  # answer 401 unless `Authorization: Bearer <key>`
    received: list[Received] = field(default_factory=list)
    got_request: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    listing_requests: int = 0
    listing_delay: float = 0.0  # before GET /v1/models answers (completions unaffected)
    aliases: list[str] | None = None  # llama.cpp's `aliases` of every listed model

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/model", self._model)
        app.router.add_post("/v1/{path:.+}", self._post)
        return app

    @property
    def generation_requests(self) -> list[Received]:
        return [r for r in self.received if r.path != "models"]

    async def _models(self, request: web.Request) -> web.Response:
        self.listing_requests += 1
        self.received.append(Received("models", dict(request.headers), None))
        if self.listing_delay:
            await asyncio.sleep(self.listing_delay)
        authorization = request.headers.get("Authorization")
        if self.require_key and authorization != f"Bearer {self.require_key}":
            return web.json_response(
                {"error": {"message": "Invalid API key", "type": "auth_error", "code": 401}},
                status=401,
            )
        data = [
            {
                "id": mid,
                "object": "model",
                "created": 1700000000,
                "owned_by": self.name,
                "meta": {"n_ctx_train": 4096},
            }
            for mid in self.model_ids
        ]
        if self.aliases is not None:
            data = [{**entry, "aliases": self.aliases} for entry in data]
        return web.json_response({"object": "list", "data": data})

    async def _model(self, request: web.Request) -> web.Response:
        if self.loaded_model is None:
            raise web.HTTPNotFound()
        return web.json_response({"id": self.loaded_model, "object": "model", "owned_by": "tabby"})

    async def _post(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        if request.content_type == "multipart/form-data":
            return await self._form(request, path)
        body = orjson.loads(await request.read())
        self.received.append(Received(path, dict(request.headers), body))
        self.got_request.set()
        try:
            return await self._answer(request, path, body)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected.set()
            raise
        except (KeyError, TypeError, AttributeError) as exc:
            # As a real server does with a body it cannot use: a 400, not a crash.
            return web.json_response(
                {
                    "error": {
                        "message": f"bad request: {exc!r}",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=400,
            )

    async def _form(self, request: web.Request, path: str) -> web.Response:
        """An upload (audio transcription): the fields as text, files by name and size."""
        form = await request.post()
        fields: dict[str, Any] = {}
        for name, value in form.items():
            if isinstance(value, str):
                fields[name] = value
            else:
                fields[name] = {"filename": value.filename, "size": len(value.file.read())}
        self.received.append(Received(path, dict(request.headers), fields))
        self.got_request.set()
        return web.json_response({"text": f"heard {fields.get('file', {}).get('size')} bytes"})

    async def _answer(self, request: web.Request, path: str, body: Any) -> web.StreamResponse:
        if self.hang:
            await asyncio.sleep(3600)
        if self.first_byte_delay:
            await asyncio.sleep(self.first_byte_delay)
        if self.fail_status is not None:
            return web.Response(
                status=self.fail_status,
                body=self.fail_body
                or orjson.dumps(
                    {
                        "error": {
                            "message": "upstream says no",
                            "type": "server_error",
                            "param": None,
                            "code": "boom",
                        }
                    }
                ),
                content_type="application/json",
            )
        model = body.get("model")
        if path == "embeddings":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            return web.json_response(
                {
                    "object": "list",
                    "model": model,
                    "data": [
                        {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                        for i, _ in enumerate(inputs)
                    ],
                    "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
                }
            )
        if body.get("stream"):
            return await self._stream(request, path, body)
        words = [f"w{i}" for i in range(self.chunks)]
        usage: dict[str, int] | None = {
            "prompt_tokens": 7,
            "completion_tokens": self.chunks,
            "total_tokens": 7 + self.chunks,
        }
        if not self.report_usage:
            usage = None
        if path == "completions":
            return web.json_response(
                {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "created": 1,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "text": " ".join(words),
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": usage,
                }
            )
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": " ".join(words)},
                    }
                ],
                "usage": usage,
                "upstream": self.name,
            }
        )

    async def _stream(self, request: web.Request, path: str, body: Any) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        model = body.get("model")
        for i in range(self.chunks):
            if self.die_after_chunks is not None and i == self.die_after_chunks:
                assert request.transport is not None
                request.transport.abort()
                return response
            if i and self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            if path == "completions":
                chunk: dict[str, Any] = {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "created": 1,
                    "model": model,
                    "choices": [{"index": 0, "text": f"w{i} ", "finish_reason": None}],
                }
            else:
                delta: dict[str, Any] = {"content": f"w{i} ", "reasoning_content": f"think{i}"}
                if i == 0:
                    delta["role"] = "assistant"
                    delta["tool_calls"] = [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ]
                chunk = {
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": model,
                    "x_unknown": {"sent_at": time.time()},
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                }
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        options = body.get("stream_options") or {}
        if options.get("include_usage") and self.report_usage:
            usage_chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": self.usage_chunk_choices,
                "usage": {
                    "prompt_tokens": 7,
                    "completion_tokens": self.chunks,
                    "total_tokens": 7 + self.chunks,
                },
            }
            await response.write(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@dataclass
class HostileUpstream:
    """An upstream that attacks its client: a gzip bomb, an endless line, a huge body.

    Any local user who listens on a scanned port is an upstream, so llproxy must survive
    these. `mode` picks the attack; `size` is how many bytes it would send (or expand
    to) if nobody stopped it; `sent` counts what it managed to send.
    """

    mode: str = "gzip_bomb"  # gzip_bomb | endless_line | huge_body
    size: int = 64 * 1024 * 1024
    stream: bool = False  # answer as an event stream (else JSON)
    prefix: bytes = b""  # sent before the attack, e.g. one good event
    model_id: str = "hostile"
    sent: int = 0
    client_left: asyncio.Event = field(default_factory=asyncio.Event)
    requests: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/{path:.+}", self._post)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model_id, "object": "model"}]}
        )

    async def _post(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests += 1
        content_type = "text/event-stream" if self.stream else "application/json"
        headers = {"Content-Type": content_type}
        if self.mode == "gzip_bomb":
            headers["Content-Encoding"] = "gzip"
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        try:
            if self.prefix:
                await response.write(self.prefix)
            for block in self._blocks():
                await response.write(block)
                self.sent += len(block)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.client_left.set()
            raise
        return response

    def _blocks(self) -> Iterator[bytes]:
        step = 256 * 1024
        if self.mode == "gzip_bomb":
            packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            zeros = b"0" * step
            for _ in range(self.size // step):
                if out := packer.compress(zeros):
                    yield out
            yield packer.flush()
        elif self.mode == "endless_line":
            yield b"data: "
            for _ in range(self.size // step):
                yield b"x" * step
        else:
            yield b'{"choices": "'
            for _ in range(self.size // step):
                yield b"x" * step
            yield b'"}'
