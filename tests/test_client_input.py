"""What a client sends that llproxy must refuse, and how: a body nested deeper than it
can write on, fields of the wrong type, methods a route does not take, HTTP/0.9; each a
4xx in the dialect's own shape, never a 500; and every answer a retry cannot change says
`x-should-retry: false`, while a 429 says when to retry."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import orjson
import pytest

from .conftest import ProxyFactory, RunningProxy, RunningUpstream, UpstreamFactory
from .dialect_validators import validate_error
from .process import create_key
from .wire import Wire

USER = [{"role": "user", "content": "hi"}]
ANTHROPIC = {"model": "fake-model", "max_tokens": 5, "messages": USER}
RESPONSES = {"model": "fake-model", "input": "hi"}
OLLAMA_CHAT = {"model": "fake-model", "messages": USER, "stream": False}
OLLAMA_GENERATE = {"model": "fake-model", "prompt": "hi", "stream": False}
# A 1x1 PNG, as Ollama's clients send images: base64 without a data: prefix.
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="


def assert_dialect_error(dialect: str, status: int, raw: bytes, want: int = 400) -> str:
    """The body is the dialect's error shape with status `want`; its message."""
    assert status == want, (status, raw[:300])
    return validate_error(dialect, raw)


async def send(
    proxy: RunningProxy, method: str, path: str, body: bytes = b"", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"{proxy.url}{path}",
            data=body,
            headers={"Content-Type": "application/json", **headers},
        ) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


def nested(depth: int) -> bytes:
    """A JSON value `depth` levels deep: lists in lists around an object."""
    return b"[" * (depth - 1) + b"{}" + b"]" * (depth - 1)


# --- nesting ------------------------------------------------------------------------


# Per route, a body with a field it passes on (to the upstream, or back in its answer)
# nested DEEP levels.
DEEP_BODIES: list[tuple[str, str, dict[str, Any]]] = [
    ("/v1/chat/completions", "openai", {"model": "fake-model", "messages": USER, "x": "DEEP"}),
    ("/v1/completions", "openai", {"model": "fake-model", "prompt": "hi", "x": "DEEP"}),
    ("/v1/embeddings", "openai", {"model": "fake-model", "input": "hi", "x": "DEEP"}),
    (
        "/v1/messages",
        "anthropic",
        {**ANTHROPIC, "tools": [{"name": "f", "input_schema": {"a": "DEEP"}}]},
    ),
    (
        "/v1/messages/count_tokens",
        "anthropic",
        {**ANTHROPIC, "tools": [{"name": "f", "input_schema": {"a": "DEEP"}}]},
    ),
    (
        "/v1/messages",
        "anthropic",
        {
            **ANTHROPIC,
            "messages": [
                *USER,
                {"role": "assistant", "content": [{"type": "tool_use", "input": {"a": "DEEP"}}]},
            ],
        },
    ),
    ("/v1/responses", "openai", {**RESPONSES, "metadata": {"a": "DEEP"}}),
    (
        "/v1/responses",
        "openai",
        {**RESPONSES, "text": {"format": {"type": "json_schema", "schema": "DEEP"}}},
    ),
    ("/api/chat", "ollama", {**OLLAMA_CHAT, "format": {"a": "DEEP"}}),
    ("/api/generate", "ollama", {**OLLAMA_GENERATE, "format": {"a": "DEEP"}}),
    ("/api/embed", "ollama", {"model": "fake-model", "input": "DEEP"}),
]


@pytest.mark.parametrize("depth", [300, 1000])
@pytest.mark.parametrize(("path", "dialect", "body"), DEEP_BODIES)
async def test_a_body_nested_too_deeply_is_a_400_in_the_dialect(
    proxy: RunningProxy,
    upstream: RunningUpstream,
    path: str,
    dialect: str,
    body: dict[str, Any],
    depth: int,
) -> None:
    """Nested 255 to 1,024 levels, a body parses but cannot be written on for the
    upstream: it was a 500 on every route."""
    raw = orjson.dumps(body).replace(b'"DEEP"', nested(depth))
    status, headers, answer = await send(proxy, "POST", path, raw)
    assert "nests deeper than 254 levels" in assert_dialect_error(dialect, status, answer)
    assert headers["x-should-retry"] == "false"
    assert upstream.fake.generation_requests == []


async def test_a_body_too_deep_is_refused_before_a_replica_is_chosen(
    proxy: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused while a replica was being sent it, the 400 was that replica's (its address
    in the access log, and a failure for whatever counts a replica's failures)."""
    caplog.set_level(logging.INFO, logger="llproxy.access")
    chat = {"model": "fake-model", "messages": USER, "x": "DEEP"}
    raw = orjson.dumps(chat).replace(b'"DEEP"', nested(300))
    status, _, _ = await send(proxy, "POST", "/v1/chat/completions", raw)
    assert status == 400
    (line,) = [r for r in caplog.records if r.name == "llproxy.access"]
    assert line.status == 400 and line.upstream is None  # type: ignore[attr-defined]


async def test_a_responses_field_echoed_in_a_stream_is_checked_at_its_depth_there(
    proxy: RunningProxy, upstream: RunningUpstream
) -> None:
    """`metadata` goes nowhere but back in the answer, and a stream's events carry it a
    level deeper than the body: 254 levels there could not be written mid-stream."""
    body = {**RESPONSES, "stream": True, "metadata": "DEEP"}
    raw = orjson.dumps(body).replace(b'"DEEP"', nested(253))
    status, _, answer = await send(proxy, "POST", "/v1/responses", raw)
    assert "nests deeper than 254 levels" in assert_dialect_error("openai", status, answer)
    assert upstream.fake.generation_requests == []
    raw = orjson.dumps(body).replace(b'"DEEP"', nested(200))
    status, _, answer = await send(proxy, "POST", "/v1/responses", raw)
    assert status == 200 and b"response.completed" in answer, answer[-300:]


async def test_a_body_nested_within_the_limit_goes_upstream(
    proxy: RunningProxy, upstream: RunningUpstream
) -> None:
    chat = {"model": "fake-model", "messages": USER, "metadata": "DEEP"}
    raw = orjson.dumps(chat).replace(b'"DEEP"', nested(250))
    status, _, answer = await send(proxy, "POST", "/v1/chat/completions", raw)
    assert status == 200, answer[:300]
    assert len(upstream.fake.generation_requests) == 1


# --- wrong types --------------------------------------------------------------------

WRONG_TYPES: list[tuple[str, str, dict[str, Any]]] = [
    ("/v1/messages", "anthropic", {**ANTHROPIC, "tools": True}),
    ("/v1/messages", "anthropic", {**ANTHROPIC, "tools": 5}),
    ("/v1/messages/count_tokens", "anthropic", {**ANTHROPIC, "tools": True}),
    (
        "/v1/messages",
        "anthropic",
        {
            **ANTHROPIC,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text"}]}
                    ],
                }
            ],
        },
    ),
    ("/v1/responses", "openai", {**RESPONSES, "tools": True}),
    ("/v1/responses", "openai", {**RESPONSES, "tools": 5}),
    ("/v1/responses", "openai", {**RESPONSES, "input": [{"type": "reasoning", "summary": True}]}),
    ("/v1/responses", "openai", {**RESPONSES, "input": [{"type": "reasoning", "summary": 5}]}),
    ("/v1/responses", "openai", {**RESPONSES, "input": [{"type": "reasoning", "content": 1}]}),
    ("/api/chat", "ollama", {**OLLAMA_CHAT, "messages": [{**USER[0], "images": ["not base64!"]}]}),
    ("/api/chat", "ollama", {**OLLAMA_CHAT, "messages": [{**USER[0], "images": [1]}]}),
    ("/api/chat", "ollama", {**OLLAMA_CHAT, "messages": [{**USER[0], "images": "x"}]}),
    ("/api/chat", "ollama", {**OLLAMA_CHAT, "messages": [{**USER[0], "images": ["é"]}]}),
    (
        "/api/chat",
        "ollama",
        {**OLLAMA_CHAT, "messages": [{**USER[0], "images": [f"data:image/png;base64,{PNG}"]}]},
    ),
    (
        "/api/chat",
        "ollama",
        {**OLLAMA_CHAT, "messages": [*USER, {"role": "assistant", "tool_calls": True}]},
    ),
    ("/api/chat", "ollama", {**OLLAMA_CHAT, "tools": True}),
    ("/api/generate", "ollama", {**OLLAMA_GENERATE, "images": [{"a": 1}]}),
    ("/api/generate", "ollama", {**OLLAMA_GENERATE, "images": ["abc"]}),
]


@pytest.mark.parametrize(("path", "dialect", "body"), WRONG_TYPES)
async def test_a_field_of_the_wrong_type_is_a_400_in_the_dialect(
    proxy: RunningProxy, upstream: RunningUpstream, path: str, dialect: str, body: dict[str, Any]
) -> None:
    status, headers, answer = await send(proxy, "POST", path, orjson.dumps(body))
    assert_dialect_error(dialect, status, answer)
    assert headers["x-should-retry"] == "false"
    assert upstream.fake.generation_requests == []


async def test_ollama_images_in_base64_go_upstream_as_data_urls(
    proxy: RunningProxy, upstream: RunningUpstream
) -> None:
    body = {**OLLAMA_CHAT, "messages": [{**USER[0], "images": [PNG]}]}
    status, _, answer = await send(proxy, "POST", "/api/chat", orjson.dumps(body))
    assert status == 200, answer[:300]
    content = upstream.fake.generation_requests[-1].body["messages"][0]["content"]
    assert content[1] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}


# --- methods, paths, HTTP/0.9 ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "dialect", "allow"),
    [
        ("GET", "/v1/messages", "anthropic", "POST"),
        ("GET", "/anthropic/v1/messages", "anthropic", "POST"),
        ("POST", "/api/tags", "ollama", "GET"),
        ("GET", "/api/chat", "ollama", "POST"),
        ("GET", "/v1/responses", "openai", "POST"),
        ("GET", "/v1/chat/completions", "openai", "POST"),
        ("POST", "/v1/models", "openai", "GET"),
        ("POST", "/anthropic/v1/models", "anthropic", "GET"),
    ],
)
async def test_a_method_a_route_does_not_take_is_a_405_in_its_dialect(
    proxy: RunningProxy, method: str, path: str, dialect: str, allow: str
) -> None:
    status, headers, answer = await send(proxy, method, path)
    assert_dialect_error(dialect, status, answer, 405)
    assert allow in headers["Allow"]
    assert headers["x-should-retry"] == "false"


async def test_a_405_on_a_shared_path_follows_the_header_that_tells_the_dialects_apart(
    proxy: RunningProxy,
) -> None:
    status, _, answer = await send(proxy, "POST", "/v1/models", **{"anthropic-version": "1"})
    assert_dialect_error("anthropic", status, answer, 405)


async def test_with_cors_unknown_paths_stay_404_and_preflights_still_work(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    origin = "https://app.example"
    proxy = await start_proxy([upstream.endpoint()], cors_origins=[origin])
    for method, path in [
        ("GET", "/nothing"),
        ("GET", "/admin/keys"),  # no admin_key: no admin API
        ("POST", "/admin/keys"),
        ("GET", "/v1/nothing"),
        ("OPTIONS", "/nothing"),
    ]:
        status, headers, answer = await send(proxy, method, path, Origin=origin)
        assert_dialect_error("openai", status, answer, 404)
        assert "Allow" not in headers
    for path in ("/v1/chat/completions", "/v1/messages", "/api/chat", "/v1/models/fake-model"):
        status, headers, _ = await send(
            proxy, "OPTIONS", path, Origin=origin, **{"Access-Control-Request-Method": "POST"}
        )
        assert status == 204, path
        assert headers["Access-Control-Allow-Origin"] == origin


async def test_with_cors_the_admin_api_keeps_its_routes(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    admin = "admin-secret-0123456789"
    proxy = await start_proxy(
        [upstream.endpoint()], cors_origins=["https://app.example"], admin_key=admin
    )
    status, _, _ = await send(proxy, "GET", "/admin/keys", Authorization=f"Bearer {admin}")
    assert status == 200
    status, _, _ = await send(proxy, "GET", "/admin/nothing", Authorization=f"Bearer {admin}")
    assert status == 404
    status, headers, _ = await send(proxy, "PUT", "/admin/keys")
    assert status == 405 and "GET" in headers["Allow"]


async def test_an_http_0_9_request_is_closed_unanswered(proxy: RunningProxy) -> None:
    """HTTP/0.9 has no status line or headers: it was answered `HTTP/0.9 403` with
    headers, which no client of either version reads right."""
    assert proxy.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    try:
        writer.write(b"GET /v1/models\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing said
    finally:
        writer.close()
    status, _, _ = await send(proxy, "GET", "/v1/models")
    assert status == 200


# --- retry advice ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "dialect", "body", "want"),
    [
        ("POST", "/v1/chat/completions", "openai", b"{}", 401),
        ("POST", "/v1/messages", "anthropic", b"{}", 401),
        ("POST", "/v1/responses", "openai", b"{}", 401),
        ("POST", "/api/chat", "ollama", b"{}", 401),
        ("GET", "/nothing", "openai", b"", 404),
    ],
)
async def test_llproxy_s_own_final_answers_say_not_to_retry(
    start_proxy: ProxyFactory,
    upstream: RunningUpstream,
    method: str,
    path: str,
    dialect: str,
    body: bytes,
    want: int,
) -> None:
    proxy = await start_proxy([upstream.endpoint()], api_keys=["static-secret-0123456789"])
    status, headers, answer = await send(proxy, method, path, body, Authorization="Bearer wrong")
    assert_dialect_error(dialect, status, answer, want)
    assert headers["x-should-retry"] == "false"


async def test_a_relayed_upstream_4xx_says_not_to_retry(
    proxy: RunningProxy, upstream: RunningUpstream
) -> None:
    upstream.fake.fail_status = 422
    status, headers, answer = await send(proxy, "POST", "/v1/messages", orjson.dumps(ANTHROPIC))
    assert_dialect_error("anthropic", status, answer, 422)
    assert headers["x-should-retry"] == "false"


def counted_anthropic(proxy: RunningProxy, key: str, wire: Wire) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=proxy.url,
        api_key=key,
        max_retries=3,
        http_client=httpx2.AsyncClient(transport=wire.transport(httpx2), timeout=30),
    )


async def test_the_anthropic_sdk_stops_after_one_refusal_of_each_kind(
    start_proxy: ProxyFactory, start_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    """Claude Code retried a wrong key 11 times over 3 minutes; with
    `x-should-retry: false` it stops after one. Here the SDK may retry 3 times: a wrong
    key (401), an operator's key (403), a model the key may not use (403), an unknown
    model (404) are each sent once."""
    state = tmp_path / "state"
    client = create_key(state, "client", "--models", "fake-*")
    operator = create_key(state, "op", "--operator")
    upstream = await start_upstream(model_ids=["fake-model", "other-model"])
    proxy = await start_proxy([upstream.endpoint()], state_dir=str(state))
    wire = Wire()
    sdk = counted_anthropic(proxy, "a-wrong-key", wire)
    refusals: list[tuple[str, str, type[anthropic.APIStatusError]]] = [
        ("a-wrong-key", "fake-model", anthropic.AuthenticationError),
        (operator, "fake-model", anthropic.PermissionDeniedError),
        (client, "other-model", anthropic.PermissionDeniedError),
        (client, "no-such-model", anthropic.NotFoundError),
    ]
    try:
        for key, model, error in refusals:
            with pytest.raises(error) as refused:
                await sdk.with_options(api_key=key).messages.create(
                    model=model,
                    max_tokens=5,
                    messages=USER,  # type: ignore[arg-type]
                )
            assert refused.value.response.headers["x-should-retry"] == "false"
    finally:
        await sdk.close()
    assert [exchange.status for exchange in wire.exchanges] == [401, 403, 403, 404]
    assert upstream.fake.generation_requests == []


async def test_the_openai_sdk_stops_after_one_wrong_key(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    proxy = await start_proxy([upstream.endpoint()], api_keys=["static-secret-0123456789"])
    wire = Wire()
    sdk = openai.AsyncOpenAI(
        base_url=f"{proxy.url}/v1",
        api_key="a-wrong-key",
        max_retries=3,
        http_client=httpx2.AsyncClient(transport=wire.transport(httpx2), timeout=30),
    )
    try:
        with pytest.raises(openai.AuthenticationError) as refused:
            await sdk.chat.completions.create(model="fake-model", messages=USER)  # type: ignore[arg-type]
    finally:
        await sdk.close()
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert [exchange.status for exchange in wire.exchanges] == [401]


@pytest.mark.parametrize(
    ("path", "body", "dialect"),
    [
        ("/v1/chat/completions", {"model": "fake-model", "messages": USER}, "openai"),
        ("/v1/messages", ANTHROPIC, "anthropic"),
        ("/v1/responses", RESPONSES, "openai"),
        ("/api/chat", OLLAMA_CHAT, "ollama"),
    ],
)
async def test_an_upstream_429_passes_its_retry_advice_on(
    proxy: RunningProxy, upstream: RunningUpstream, path: str, body: dict[str, Any], dialect: str
) -> None:
    upstream.fake.fail_status = 429
    upstream.fake.fail_headers = {"Retry-After": "7", "retry-after-ms": "6500"}
    status, headers, answer = await send(proxy, "POST", path, orjson.dumps(body))
    assert_dialect_error(dialect, status, answer, 429)
    assert headers["Retry-After"] == "7"
    assert headers["retry-after-ms"] == "6500"
    assert "x-should-retry" not in headers


async def test_the_openai_sdk_waits_as_the_upstream_s_429_says(
    proxy: RunningProxy, upstream: RunningUpstream
) -> None:
    upstream.fake.fail_status = 429
    upstream.fake.fail_headers = {"retry-after-ms": "20"}
    sdk = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="none", max_retries=2)
    try:
        with pytest.raises(openai.RateLimitError) as limited:
            await sdk.chat.completions.create(model="fake-model", messages=USER)  # type: ignore[arg-type]
    finally:
        await sdk.close()
    assert limited.value.response.headers["retry-after-ms"] == "20"
    assert len(upstream.fake.generation_requests) == 3


@pytest.mark.parametrize(
    ("path", "body", "dialect"),
    [("/v1/messages", ANTHROPIC, "anthropic"), ("/api/chat", OLLAMA_CHAT, "ollama")],
)
async def test_llproxy_s_own_429_says_when_to_retry_in_every_dialect(
    start_proxy: ProxyFactory,
    upstream: RunningUpstream,
    path: str,
    body: dict[str, Any],
    dialect: str,
) -> None:
    proxy = await start_proxy([upstream.endpoint()], rate_limit="1 per minute")
    await send(proxy, "POST", path, orjson.dumps(body))
    status, headers, answer = await send(proxy, "POST", path, orjson.dumps(body))
    assert_dialect_error(dialect, status, answer, 429)
    assert int(headers["Retry-After"]) >= 1
    assert "x-should-retry" not in headers


async def test_a_body_nested_too_deeply_for_an_operator_never_reaches_the_desk(
    start_proxy: ProxyFactory,
) -> None:
    """The desk writes a ticket's messages to the operator as JSON: a body too deep for
    that is refused before it is queued (it waited for an operator, then failed)."""
    operator = {"operator": "human", "tags": ["support"], "queue_timeout": 2}
    proxy = await start_proxy([operator])
    chat = {"model": "human:support", "messages": [{"role": "user", "content": "DEEP"}]}
    # 253 levels: the body could be written, the desk's event carrying it could not.
    for depth in (250, 300):
        raw = orjson.dumps(chat).replace(b'"DEEP"', nested(depth))
        status, _, answer = await send(proxy, "POST", "/v1/chat/completions", raw)
        assert "nests deeper than 254 levels" in assert_dialect_error("openai", status, answer)
