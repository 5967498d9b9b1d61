"""A fake OpenAI-compatible server for tests: real HTTP on loopback, with knobs.

Knobs (attributes of FakeUpstream, changeable while it runs): delay before headers and
before the model listing, number of stream chunks and the gap between them, a failure
status, hang forever, die after N chunks. It records every request it received and
notices when a client hangs up.
"""

from __future__ import annotations

import asyncio
import json
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
    fail_headers: dict[str, str] = field(default_factory=dict)  # sent with fail_status
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
    gate: asyncio.Event | None = None  # when set here, answers wait until the test sets it

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
        if self.gate is not None:
            await self.gate.wait()
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
                headers=self.fail_headers,
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


# Each fault an upstream's answer can have, by name; `FaultyUpstream` serves one model per
# fault (`fault-<name>`), so one daemon reaches every fault without changing a knob.
FAULTS = (
    "cut",  # whole: the JSON cut at half (clean framing); stream: the last event cut
    "invalid_json",  # whole: not JSON; stream: one garbled chunk among good ones
    "nan",  # whole: NaN in the usage; stream: one chunk with a NaN among good ones
    "wrong_shape",  # a JSON array where an object belongs
    "tool_calls_string",  # tool_calls: "x"
    "content_number",  # content: 5
    "choices_not_list",  # choices: "x"
    "message_not_object",  # message (delta): "x"
    "usage_not_int",  # usage.prompt_tokens: "7"
    "other_form",  # a stream to a request for a whole answer, JSON to a stream request
    "hang",  # headers, then nothing
    "reset",  # the connection dropped mid-body
    "html_5xx",  # 502 with a proxy's HTML page
)
FAULT_TEXT = ("Hello", ", wor", "ld", "!")  # what a good answer says, chunk by chunk


@dataclass
class FaultyUpstream:
    """An OpenAI chat-completions server whose answers are broken in one way each, written
    from the protocol: a chat.completion object, or chat.completion.chunk events ended by
    `data: [DONE]`, usage in a last `choices: []` chunk."""

    hang_for: float = 60.0
    requests: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": f"fault-{fault}", "object": "model"} for fault in FAULTS]
        return web.json_response({"object": "list", "data": data})

    @staticmethod
    def _whole(fault: str) -> bytes:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(FAULT_TEXT)}
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
        usage: dict[str, Any] = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        document: Any = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1}
        document |= {"model": f"fault-{fault}", "choices": [choice], "usage": usage}
        if fault == "tool_calls_string":
            message["tool_calls"] = "x"
        elif fault == "content_number":
            message["content"] = 5
        elif fault == "choices_not_list":
            document["choices"] = "x"
        elif fault == "message_not_object":
            choice["message"] = "x"
        elif fault == "usage_not_int":
            usage["prompt_tokens"] = "7"
        elif fault == "wrong_shape":
            document = [message]
        raw = json.dumps(document).encode()
        if fault == "nan":
            raw = raw.replace(b'"prompt_tokens": 5', b'"prompt_tokens": NaN')
        elif fault == "invalid_json":
            raw = raw[:-1] + b",,}"
        elif fault == "cut":
            raw = raw[: len(raw) // 2]
        return raw

    @staticmethod
    def _events(fault: str) -> list[bytes]:
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1}
        base["model"] = f"fault-{fault}"

        def chunk(delta: Any, finish: str | None = None, **extra: Any) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {**base, "choices": [choice], **extra}

        chunks: list[Any] = [chunk({"role": "assistant", "content": ""})]
        chunks += [chunk({"content": text}) for text in FAULT_TEXT]
        chunks.append(chunk({}, "stop"))
        usage: dict[str, Any] = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        chunks.append({**base, "choices": [], "usage": usage})
        bad: Any = None
        if fault == "tool_calls_string":
            bad = chunk({"tool_calls": "x"})
        elif fault == "content_number":
            bad = chunk({"content": 5})
        elif fault == "choices_not_list":
            bad = {**base, "choices": "x"}
        elif fault == "message_not_object":
            bad = chunk("x")
        elif fault == "wrong_shape":
            bad = ["Hello"]
        elif fault == "usage_not_int":
            usage["prompt_tokens"] = "7"
        if bad is not None:
            chunks.insert(2, bad)
        events = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
        if fault == "invalid_json":
            events.insert(2, b'data: {"choices": [{"delta": {"content": "x"\n\n')
        elif fault == "nan":
            events.insert(2, b'data: {"choices": [], "usage": {"prompt_tokens": NaN}}\n\n')
        events.append(b"data: [DONE]\n\n")
        if fault == "cut":  # the stream ends inside its last chunk
            events = [*events[:3], events[3][: len(events[3]) // 2]]
        return events

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests += 1
        fault = str(body.get("model", "")).removeprefix("fault-")
        stream = body.get("stream") is True
        if fault == "other_form":
            stream = not stream
        if fault == "html_5xx":
            page = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
            return web.Response(status=502, text=page, content_type="text/html")
        if not stream:
            raw = self._whole(fault)
            if fault == "reset":  # the whole length announced, half of it sent
                response = web.StreamResponse(headers={"Content-Type": "application/json"})
                response.content_length = len(raw)
                await response.prepare(request)
                await response.write(raw[: len(raw) // 2])
                assert request.transport is not None
                request.transport.close()
                return response
            if fault == "hang":
                return await self._hang(request, "application/json")
            return web.Response(body=raw, content_type="application/json")
        if fault == "hang":
            return await self._hang(request, "text/event-stream")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n, event in enumerate(self._events(fault)):
            if fault == "reset" and n == 3:
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(event)
        await response.write_eof()
        return response

    async def _hang(self, request: web.Request, content_type: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        await asyncio.sleep(self.hang_for)
        return response
