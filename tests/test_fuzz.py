"""Property-based fuzzing of what parses client input: whatever a client sends, on any
dialect's route, llproxy answers 2xx or a 4xx in the client's shape, never a 5xx of its
own, and the parsers below it refuse only with their own errors."""

from __future__ import annotations

import asyncio
import copy
import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llproxy.config import parse_config
from llproxy.core.errors import InvalidRequest
from llproxy.core.multipart import FormBody
from llproxy.gateway.hardening import host_name
from llproxy.server.app import serve_alone

from .dialect_validators import validate_error
from .fake_upstream import FakeUpstream

PATHS = ["chat/completions", "completions", "embeddings", "audio/transcriptions", "rerank"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Bodies that get past JSON parsing and reach the validators: the fields they look at.
request_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["fake-model", "nope", ""]) | json_values,
        "messages": st.lists(
            st.fixed_dictionaries({}, optional={"role": json_values, "content": json_values})
            | json_values,
            max_size=3,
        )
        | json_values,
        "prompt": json_values,
        "input": json_values,
        "stream": st.booleans() | json_values,
        "stream_options": json_values,
        "temperature": json_values,
        "max_tokens": json_values,
        "max_completion_tokens": json_values,
    },
)


class Servers:
    """A fake upstream and the llproxy app, on a loop of their own in a thread, so plain
    synchronous hypothesis tests can send to them."""

    def __init__(self, state: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.state = state
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.runners: list[web.AppRunner] = []

    def _run(self) -> None:
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        upstream = web.AppRunner(FakeUpstream().app())
        await upstream.setup()
        site = web.TCPSite(upstream, "127.0.0.1", 0)
        await site.start()
        upstream_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        config = parse_config(
            {
                "endpoints": [{"hostname": "127.0.0.1", "port_start": upstream_port}],
                "state_dir": str(self.state),
                "rate_limit": None,
            }
        )
        proxy = web.AppRunner(serve_alone(config))
        await proxy.setup()
        proxy_site = web.TCPSite(proxy, "127.0.0.1", 0)
        await proxy_site.start()
        self.port = proxy_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.runners = [proxy, upstream]

    def stop(self) -> None:
        async def cleanup() -> None:
            for runner in self.runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        """POST to a path below /v1/ (`chat/completions`), or to a whole path (`/api/chat`)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(
                "POST",
                path if path.startswith("/") else f"/v1/{path}",
                body=body,
                headers={"Content-Type": content_type},
            )
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    running = Servers(tmp_path_factory.mktemp("fuzz-state"))
    running.thread.start()
    assert running.ready.wait(30)
    yield running
    running.stop()


def assert_client_shaped(status: int, raw: bytes) -> None:
    assert status < 500, (status, raw[:300])
    if status >= 400:
        error = orjson.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"}, raw[:300]


fuzz = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@fuzz
@given(path=st.sampled_from(PATHS), body=request_bodies)
def test_any_json_body_is_answered_in_the_client_shape(
    servers: Servers, path: str, body: dict[str, Any]
) -> None:
    status, raw = servers.post(path, json.dumps(body).encode(), "application/json")
    assert_client_shaped(status, raw)


@fuzz
@given(path=st.sampled_from(PATHS), raw=st.binary(max_size=300), as_json=st.booleans())
def test_any_bytes_are_answered_in_the_client_shape(
    servers: Servers, path: str, raw: bytes, as_json: bool
) -> None:
    content_type = "application/json" if as_json else "multipart/form-data; boundary=b"
    status, answer = servers.post(path, raw, content_type)
    assert_client_shaped(status, answer)


form_parts = st.lists(
    st.tuples(st.sampled_from(["model", "file", "x", 'a"b']), st.binary(max_size=40)),
    max_size=4,
)


@fuzz
@given(parts=form_parts, tail=st.binary(max_size=20), boundary=st.sampled_from(["b", "xyz"]))
def test_any_form_is_parsed_or_refused_as_invalid(
    parts: list[tuple[str, bytes]], tail: bytes, boundary: str
) -> None:
    raw = (
        b"".join(
            b"--"
            + boundary.encode()
            + b'\r\nContent-Disposition: form-data; name="'
            + name.encode()
            + b'"\r\n\r\n'
            + value
            + b"\r\n"
            for name, value in parts
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
        + tail
    )
    try:
        form = FormBody(raw, f"multipart/form-data; boundary={boundary}")
        form.field("model")
        rebuilt = FormBody(
            form.with_field("model", "m"), f"multipart/form-data; boundary={boundary}"
        )
    except InvalidRequest:
        return
    assert rebuilt.field("model") == "m"


@fuzz
@given(st.text(max_size=60))
def test_any_host_header_parses_or_is_refused(header: str) -> None:
    name = host_name(header)
    assert name is None or (name == name.lower() and " " not in name and "@" not in name)


# --- every dialect's routes ------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]
# Per route: the dialect whose error shape it answers in, and a body using most of the
# fields its translator reads; the fuzz changes some of them.
# A Gemini request using most of what the face reads.
GEMINI_BODY: dict[str, Any] = {
    "contents": [
        {"role": "user", "parts": [{"text": "hi"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"a": 1}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"r": 2}}}]},
    ],
    "systemInstruction": {"parts": [{"text": "be brief"}]},
    "tools": [{"functionDeclarations": [{"name": "f", "parameters": {"type": "object"}}]}],
    "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}},
    "generationConfig": {"temperature": 1, "maxOutputTokens": 5, "stopSequences": ["x"]},
}

DIALECT_ROUTES: list[tuple[str, str, dict[str, Any]]] = [
    (
        "/v1/messages",
        "anthropic",
        {
            "model": "fake-model",
            "max_tokens": 10,
            "system": [{"type": "text", "text": "s"}],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hi"},
                        {"type": "image", "source": {"type": "base64", "data": "AAAA"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hm"},
                        {"type": "text", "text": "x"},
                        {"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [{"type": "text", "text": "r"}],
                        }
                    ],
                },
            ],
            "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "auto"},
            "stop_sequences": ["x"],
            "thinking": {"type": "enabled", "budget_tokens": 100},
            "metadata": {"user_id": "u"},
        },
    ),
    (
        "/v1/messages/count_tokens",
        "anthropic",
        {"model": "fake-model", "messages": USER, "tools": [{"name": "f", "input_schema": {}}]},
    ),
    (
        "/v1/responses",
        "openai",
        {
            "model": "fake-model",
            "instructions": "i",
            "input": [
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "hi"}],
                },
                {"type": "reasoning", "summary": [{"type": "summary_text", "text": "t"}]},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": "o"},
            ],
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": "auto",
            "max_output_tokens": 5,
            "reasoning": {"effort": "low"},
            "text": {"format": {"type": "json_schema", "name": "n", "schema": {}}},
            "metadata": {"a": "b"},
        },
    ),
    (
        "/api/chat",
        "ollama",
        {
            "model": "fake-model",
            "messages": [
                {"role": "user", "content": "hi", "images": ["iVBORw0KGgo="]},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
                },
                {"role": "tool", "content": "r", "tool_name": "f"},
            ],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "options": {"num_predict": 5, "temperature": 1},
            "format": {"type": "object"},
            "think": "low",
            "stream": False,
        },
    ),
    (
        "/api/generate",
        "ollama",
        {
            "model": "fake-model",
            "prompt": "p",
            "system": "s",
            "images": ["iVBORw0KGgo="],
            "options": {"num_predict": 5},
            "format": "json",
            "stream": False,
        },
    ),
    ("/api/generate", "ollama", {"model": "fake-model", "prompt": "p", "suffix": "s", "raw": True}),
    ("/api/embed", "ollama", {"model": "fake-model", "input": ["a", "b"], "dimensions": 4}),
    ("/api/embeddings", "ollama", {"model": "fake-model", "prompt": "x"}),
    ("/api/show", "ollama", {"model": "fake-model"}),
    (
        "/v1/chat/completions",
        "openai",
        {"model": "fake-model", "messages": USER, "max_tokens": 5, "stream": True},
    ),
    ("/v1/completions", "openai", {"model": "fake-model", "prompt": "p", "max_tokens": 5}),
    ("/v1/embeddings", "openai", {"model": "fake-model", "input": "x"}),
    *(
        (f"/v1beta/models/fake-model:{method}", "gemini", GEMINI_BODY)
        for method in ("generateContent", "streamGenerateContent?alt=sse", "countTokens")
    ),
]
# Field names the translators read, for the fuzz to put anywhere.
FIELDS = sorted(
    {"type", "text", "role", "content", "name", "input", "id", "source", "data", "url"}
    | {"summary", "arguments", "function", "images", "tool_calls", "image_url", "output"}
    | {"call_id", "parameters", "input_schema", "thinking", "tool_use_id", "is_error"}
    | {"schema", "format", "effort", "tools", "tool_choice", "system", "stop_sequences"}
    | {"max_tokens", "stream", "metadata", "instructions", "reasoning", "prompt", "options"}
    | {"max_output_tokens", "think", "suffix", "raw", "keep_alive", "messages", "model"}
)
# A value nested this deep is written in the body's bytes (it cannot be encoded).
DEEP = "\u0000deep"
deep_json = {DEEP: b"[" * 600 + b"]" * 600}
wrong_values = st.sampled_from(
    [
        *(True, False, 0, 5, -1, 1.5, "x", "", [], {}, [1], [True], ["x"], [{}], {"a": 1}, None),
        *("user", "assistant", "tool", "text", "tool_result", "tool_use", "function"),
        *("reasoning", "base64", "data:image/png;base64,AAAA", 2**63, DEEP),
    ]
).map(copy.deepcopy)  # each its own: the fuzz changes the lists and objects it placed
values = st.recursive(
    wrong_values,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=3)
    ),
    max_leaves=6,
)


def _containers(document: Any) -> list[Any]:
    found = [document]
    for value in document.values() if isinstance(document, dict) else document:
        if isinstance(value, dict | list):
            found += _containers(value)
    return found


@st.composite
def dialect_requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """A route, its dialect, and a body: the route's own with one to three changes
    (a known field anywhere given a value of any type, or an element replaced), or a
    random object."""
    path, dialect, base = draw(st.sampled_from(DIALECT_ROUTES))
    if draw(st.integers(0, 9)) == 0:
        document: Any = draw(st.dictionaries(st.sampled_from(FIELDS), values, max_size=5))
    else:
        document = copy.deepcopy(base)
        for _ in range(draw(st.integers(1, 3))):
            node = draw(st.sampled_from(_containers(document)))
            if isinstance(node, dict):
                node[draw(st.sampled_from(sorted(node) + FIELDS))] = draw(values)
            elif node:
                node[draw(st.integers(0, len(node) - 1))] = draw(values)
    raw = orjson.dumps(document)
    return path, dialect, raw.replace(orjson.dumps(DEEP), deep_json[DEEP])


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=dialect_requests())
def test_every_dialect_answers_any_body_in_its_shape(
    servers: Servers, request: tuple[str, str, bytes]
) -> None:
    """Never a 5xx of llproxy's own on any dialect's route, and a refusal in the route's
    dialect: the body's fields of the wrong type or nested too deeply are 400s."""
    path, dialect, body = request
    status, raw = servers.post(path, body, "application/json")
    assert status < 500, (path, status, raw[:300], body[:300])
    if status >= 400:
        validate_error(dialect, raw)


@fuzz
@given(
    route=st.sampled_from(DIALECT_ROUTES),
    raw=st.binary(max_size=200) | st.sampled_from([b"", b"[]", b"null", b"{", b'{"a":1}']),
)
def test_every_dialect_answers_any_bytes_in_its_shape(
    servers: Servers, route: tuple[str, str, dict[str, Any]], raw: bytes
) -> None:
    path, dialect, _ = route
    status, answer = servers.post(path, raw, "application/json")
    assert status < 500, (path, status, answer[:300])
    if status >= 400:
        validate_error(dialect, answer)
