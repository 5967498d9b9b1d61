"""A scripted fake OpenAI chat-completions upstream for llproxy's translator tests.

Written from the OpenAI streaming protocol (chat.completion.chunk frames, `data: [DONE]`,
usage in a trailing `choices: []` chunk only with stream_options.include_usage) plus the
llama.cpp and vLLM extras the proxy reads (/tokenize, /props, meta.n_ctx_train,
max_model_len, choices[].stop_reason). It records every request and sets `disconnected`
when a client hangs up, so tests can assert that the proxy released the upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

SCENARIOS = (
    "text", "reasoning", "reasoning_alt", "tools_fragmented", "tools_args_at_end",
    "tools_interleaved", "text_then_tool", "length", "stop_sequence", "fail_mid_stream",
    "http_error", "empty",
)  # fmt: skip
Json = dict[str, Any]
Step = tuple[Json, str | None]  # (delta, finish_reason)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What each tool scenario must reassemble to: index -> (id, name, parsed arguments).
EXPECTED_TOOLS: dict[str, dict[int, tuple[str, str, dict[str, Any]]]] = {
    "tools_fragmented": {0: ("call_frag0", "get_weather", {"city": "Paris"})},
    "tools_args_at_end": {0: ("call_end0", "get_weather", {"city": "Paris", "unit": "c"})},
    "tools_interleaved": {
        0: ("call_il0", "get_weather", {"city": "Paris"}),
        1: ("call_il1", "get_time", {"tz": "UTC"}),
    },
    "text_then_tool": {0: ("call_tt0", "get_weather", {"city": "Oslo"})},
}


def _tc(index: int, args: str | None = None, id_: str = "", name: str = "") -> dict[str, Any]:
    """One streamed tool_calls fragment; id, type and name only where they first appear."""
    frag: dict[str, Any] = {"index": index, "function": {}}
    if id_:
        frag.update(id=id_, type="function")
    if name:
        frag["function"]["name"] = name
    if args is not None:
        frag["function"]["arguments"] = args
    return {"tool_calls": [frag]}


def script(scenario: str) -> list[Step]:
    """The delta sequence of a scenario, role chunk first, finish_reason on the last."""
    role: Step = ({"role": "assistant", "content": ""}, None)
    tool_role: Step = ({"role": "assistant", "content": None}, None)
    if scenario in ("text", "fail_mid_stream", "http_error"):
        words = ("Hello", ", wor", "ld", "!")
        return [role, *(({"content": t}, None) for t in words), ({}, "stop")]
    if scenario in ("reasoning", "reasoning_alt"):  # vLLM/DeepSeek vs Ollama/LM Studio field
        key = "reasoning_content" if scenario == "reasoning" else "reasoning"
        parts = [{key: "Let me "}, {key: "think."}, {"content": "It is "}, {"content": "4."}]
        return [role, *((p, None) for p in parts), ({}, "stop")]
    if scenario == "tools_fragmented":  # first argument fragment before id and name
        return [
            tool_role,
            (_tc(0, '{"ci'), None),
            (_tc(0, 'ty": "Pa', id_="call_frag0", name="get_weather"), None),
            (_tc(0, 'ris"}'), None),
            ({}, "tool_calls"),
        ]
    if scenario == "tools_args_at_end":  # LM Studio/Qwen3: all arguments with the finish
        return [
            tool_role,
            (_tc(0, "", id_="call_end0", name="get_weather"), None),
            (_tc(0, '{"city": "Paris", "unit": "c"}'), "tool_calls"),
        ]
    if scenario == "tools_interleaved":
        frags = [(0, '{"city": '), (1, '{"tz": '), (0, '"Paris"}'), (1, '"UTC"}')]
        return [
            tool_role,
            (_tc(0, "", id_="call_il0", name="get_weather"), None),
            (_tc(1, "", id_="call_il1", name="get_time"), None),
            *((_tc(i, a), None) for i, a in frags),
            ({}, "tool_calls"),
        ]
    if scenario == "text_then_tool":
        return [
            role,
            ({"content": "Let me check."}, None),
            (_tc(0, '{"city":', id_="call_tt0", name="get_weather"), None),
            (_tc(0, ' "Oslo"}'), None),
            ({}, "tool_calls"),
        ]
    if scenario == "empty":  # a model that says nothing at all
        return [role, ({}, "stop")]
    if scenario == "length":
        return [role, ({"content": "This is a long"}, None), ({"content": " answer"}, "length")]
    if scenario == "stop_sequence":
        return [role, ({"content": "Counting: 1, "}, None), ({"content": "2, 3"}, "stop")]
    raise ValueError(f"unknown scenario {scenario!r}; known: {SCENARIOS}")


def assemble(steps: list[Step]) -> tuple[dict[str, Any], str]:
    """Fold a script into the non-streamed message, keeping the first id/name seen."""
    msg: dict[str, Any] = {"role": "assistant", "content": None}
    calls: dict[int, dict[str, Any]] = {}
    finish = "stop"
    for delta, fr in steps:
        for key in ("content", "reasoning_content", "reasoning"):
            if delta.get(key):
                msg[key] = (msg.get(key) or "") + delta[key]
        for frag in delta.get("tool_calls", []):
            empty = {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            call, fn = calls.setdefault(frag["index"], empty), frag.get("function", {})
            call["id"] = call["id"] or frag.get("id", "")
            call["function"]["name"] = call["function"]["name"] or fn.get("name", "")
            call["function"]["arguments"] += fn.get("arguments") or ""
        finish = fr or finish
    if calls:
        msg["tool_calls"] = [calls[i] for i in sorted(calls)]
    return msg, finish


@dataclass
class ScenarioUpstream:
    """Knobs are plain attributes; change them between requests to switch behaviour.

    n_ctx_train / max_model_len: add llama.cpp `meta` / vLLM `max_model_len` to /v1/models.
    tokenize_enabled / props_enabled: False makes POST /tokenize / GET /props answer 404.
    template_enabled: llama.cpp's POST /apply-template renders a ChatML-like template
    (False: 404, as an older llama.cpp). vllm_tokenize: POST /tokenize also takes
    `messages` (and `tools`) and counts them templated, as vLLM; else it reads only
    `content`, as llama.cpp (no content: no tokens). A token is a whitespace-separated word.
    fail_after: chunks sent before fail_mid_stream cuts the socket.
    error_status: status of the OpenAI-style error body in the http_error scenario.
    stop_string: matched stop reported by stop_sequence unless the request has `stop`.
    first_chunk_delay: silent prefill before any byte; chunk_delay: pause between chunks.
    other_form: answer in the form not asked for (a stream to a request for a whole
    answer, a whole answer to a stream request), as some servers do.
    cached_tokens: the part of prompt_tokens the usage says came from the prefix cache.
    """

    scenario: str = "text"
    model_id: str = "fake-model"
    n_ctx_train: int | None = None
    max_model_len: int | None = None
    tokenize_enabled: bool = True
    template_enabled: bool = True
    vllm_tokenize: bool = False
    props_enabled: bool = True
    chat_template: str | None = None  # GET /props gives it when set
    props_delay: float = 0.0  # before GET /props answers (a busy server)
    n_ctx: int = 8192
    prompt_tokens: int = 11
    completion_tokens: int = 7
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, if set
    fail_after: int = 2
    error_status: int = 500
    stop_string: str = "###"
    first_chunk_delay: float = 0.0
    chunk_delay: float = 0.0
    other_form: bool = False
    embedding_dims: int = 8
    requests: list[dict[str, Any]] = field(default_factory=list)  # method, path, body, headers
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    disconnect_paths: list[str] = field(default_factory=list)
    url: str = ""  # the base URL, once started
    _runner: web.AppRunner | None = field(default=None, init=False, repr=False)

    def app(self) -> web.Application:
        """Build the aiohttp application serving the current knobs."""

        @web.middleware
        async def watch(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                return await handler(request)
            except asyncio.CancelledError:  # handler_cancellation=True, e.g. aiohttp TestServer
                self._mark_gone(request)
                raise

        app = web.Application(middlewares=[watch])
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/apply-template", self._apply_template)
        app.router.add_get("/props", self._props)
        return app

    async def start(self, host: str = "127.0.0.1", handler_cancellation: bool = False) -> str:
        """Serve on a real port with production aiohttp defaults; returns the base URL."""
        self._runner = web.AppRunner(self.app(), handler_cancellation=handler_cancellation)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        """Stop a server begun with start()."""
        if self._runner is not None:
            await self._runner.cleanup()

    def bodies(self, path: str = "/v1/chat/completions") -> list[Any]:
        """The recorded JSON bodies sent to one path, oldest first."""
        return [r["body"] for r in self.requests if r["path"] == path]

    @property
    def usage(self) -> dict[str, int]:
        p, c = self.prompt_tokens, self.completion_tokens
        usage: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        if self.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage

    async def _record(self, request: web.Request) -> dict[str, Any]:
        body = await request.json() if request.can_read_body else {}
        entry = {"method": request.method, "path": request.path, "body": body}
        self.requests.append({**entry, "headers": dict(request.headers)})
        return body if isinstance(body, dict) else {}

    def _mark_gone(self, request: web.Request) -> None:
        self.disconnect_paths.append(request.path)
        self.disconnected.set()

    def _gone(self, request: web.Request) -> bool:
        if request.transport is None or request.transport.is_closing():
            self._mark_gone(request)
            return True
        return False

    async def _sleep(self, request: web.Request, seconds: float) -> bool:
        """Sleep while polling the socket: production aiohttp never cancels the handler."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self._gone(request):
                return False
            await asyncio.sleep(min(0.02, left))
        return not self._gone(request)

    async def _send(self, request: web.Request, resp: web.StreamResponse, data: str) -> bool:
        try:
            await resp.write(f"data: {data}\n\n".encode())
        except (ConnectionResetError, OSError):
            self._mark_gone(request)
            return False
        return True

    @staticmethod
    def _not_found() -> web.Response:
        return web.json_response({"error": {"message": "not found", "code": 404}}, status=404)

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        model: dict[str, Any] = {"id": self.model_id, "object": "model", "owned_by": "scenario"}
        model["created"] = 1700000000
        if self.n_ctx_train is not None:
            model["meta"] = {"n_ctx_train": self.n_ctx_train, "n_vocab": 32000}
        if self.max_model_len is not None:
            model["max_model_len"] = self.max_model_len
        return web.json_response({"object": "list", "data": [model]})

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if not self.tokenize_enabled:
            return self._not_found()
        if self.vllm_tokenize and "messages" in body:
            words = render_template(body).split()
        else:
            words = str(body.get("content", "")).split()
        ids = [int(hashlib.md5(w.encode()).hexdigest()[:4], 16) for w in words]
        if self.vllm_tokenize:
            return web.json_response({"count": len(ids), "max_model_len": 8192, "tokens": ids})
        return web.json_response({"tokens": ids})

    async def _apply_template(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if not self.template_enabled:
            return self._not_found()
        if not isinstance(body.get("messages"), list):
            return web.json_response({"error": {"message": "'messages' is required"}}, status=400)
        return web.json_response({"prompt": render_template(body)})

    async def _props(self, request: web.Request) -> web.Response:
        await self._record(request)
        if self.props_delay:
            await asyncio.sleep(self.props_delay)
        if not self.props_enabled:
            return self._not_found()
        settings = {"n_ctx": self.n_ctx, "params": {"n_predict": -1}}
        props: dict[str, Any] = {"default_generation_settings": settings, "total_slots": 1}
        if self.chat_template is not None:
            props["chat_template"] = self.chat_template
        return web.json_response({**props, "model_path": f"/models/{self.model_id}.gguf"})

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        inputs = body.get("input", "")
        data = []
        for i, text in enumerate([inputs] if isinstance(inputs, str) else inputs):
            vec = [b / 255 for b in hashlib.sha256(str(text).encode()).digest()]
            vec = vec[: self.embedding_dims]
            data.append({"object": "embedding", "index": i, "embedding": vec})
        usage = {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens}
        doc = {"object": "list", "data": data, "model": self.model_id}
        return web.json_response({**doc, "usage": usage})

    async def _prelude(self, request: web.Request, body: dict[str, Any]) -> web.Response | None:
        """Prefill delay and the http_error scenario, shared by both generation routes."""
        if self.first_chunk_delay and not await self._sleep(request, self.first_chunk_delay):
            return web.Response(status=499)
        if self.scenario == "http_error":
            err = {"message": f"scenario error {self.error_status}", "type": "server_error"}
            return web.json_response({"error": err}, status=self.error_status)
        if self.scenario == "fail_mid_stream" and not body.get("stream"):
            assert request.transport is not None
            request.transport.close()  # non-streamed: drop the connection without an answer
            return web.Response(status=500)
        return None

    async def _stream(self, request: web.Request, chunks: list[Json]) -> web.StreamResponse:
        """Write SSE chunks then [DONE]; fail_mid_stream cuts the socket after fail_after."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for n, chunk in enumerate(chunks):
            if self.scenario == "fail_mid_stream" and n == self.fail_after:
                assert request.transport is not None
                request.transport.close()  # flushes what was written, then closes mid-body
                return resp
            if n and self.chunk_delay and not await self._sleep(request, self.chunk_delay):
                return resp
            if not await self._send(request, resp, json.dumps(chunk)):
                return resp
        if await self._send(request, resp, "[DONE]"):
            await resp.write_eof()
        return resp

    def steps(self, body: dict[str, Any]) -> list[Step]:
        """The chat answer to one request body: the scenario's script. A subclass may
        answer each request after its content (a tool call, then text after the result)."""
        return script(self.scenario)

    def _matched_stop(self, body: dict[str, Any]) -> str:
        stop = body.get("stop")
        return str((stop[0] if isinstance(stop, list) and stop else stop) or self.stop_string)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if (early := await self._prelude(request, body)) is not None:
            return early
        steps = self.steps(body)
        vllm_stop = {}  # vLLM reports the matched stop string in choices[].stop_reason
        if self.scenario == "stop_sequence":
            vllm_stop = {"stop_reason": self._matched_stop(body)}
        base = {"id": "chatcmpl-scenario", "created": int(time.time()), "model": self.model_id}
        usage = {"usage": self.usage}
        if bool(body.get("stream")) == self.other_form:
            msg, finish = assemble(steps)
            choice = {"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}
            choices = [{**choice, **vllm_stop}]
            doc = {**base, "object": "chat.completion", "choices": choices}
            return web.json_response({**doc, **usage})
        chunks: list[dict[str, Any]] = []
        for delta, fr in steps:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": fr}
            choices = [{**choice, **(vllm_stop if fr else {})}]
            chunks.append({**base, "object": "chat.completion.chunk", "choices": choices})
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**base, "object": "chat.completion.chunk", "choices": [], **usage})
        return await self._stream(request, chunks)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if (early := await self._prelude(request, body)) is not None:
            return early
        pieces = [d["content"] for d, _ in script(self.scenario) if d.get("content")]
        finish = "length" if self.scenario == "length" else "stop"
        base = {"id": "cmpl-scenario", "object": "text_completion", "created": int(time.time())}
        base["model"] = self.model_id
        if bool(body.get("stream")) == self.other_form:
            choice = {"index": 0, "text": "".join(pieces), "logprobs": None}
            choice["finish_reason"] = finish
            return web.json_response({**base, "choices": [choice], "usage": self.usage})
        ends = [None] * (len(pieces) - 1) + [finish]
        chunks = [
            {**base, "choices": [{"index": 0, "text": p, "logprobs": None, "finish_reason": f}]}
            for p, f in zip(pieces, ends, strict=True)
        ]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**base, "choices": [], "usage": self.usage})
        return await self._stream(request, chunks)


def render_template(body: dict[str, Any]) -> str:
    """A ChatML-like chat template, as a server renders it: tools in a system turn, each
    message's text in its own turn, the assistant's turn opened."""
    turns = []
    if body.get("tools"):
        listed = "\n".join(json.dumps(tool.get("function")) for tool in body["tools"])
        turns.append(f"<|im_start|>system\n# Tools\n{listed}<|im_end|>")
    for message in body["messages"]:
        content = message.get("content") or ""
        if isinstance(content, list):
            content = " ".join(part.get("text", "") for part in content)
        turns.append(f"<|im_start|>{message['role']}\n{content}<|im_end|>")
    return "\n".join([*turns, "<|im_start|>assistant\n"])
