"""The HTTP API end to end: the openai SDK -> real llproxy app -> real fake upstream."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from yarl import URL

from .conftest import (
    ProxyFactory,
    RunningProxy,
    RunningUpstream,
    UpstreamFactory,
    chat_request,
)

CHAT = [{"role": "user", "content": "hi"}]


def assert_openai_error(body: Any, type_: str | None = None, code: Any = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if type_ is not None:
        assert body["error"]["type"] == type_
    if code is not None:
        assert body["error"]["code"] == code


async def raw_post(proxy: RunningProxy, path: str, data: bytes, **headers: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}{path}", data=data, headers={"Content-Type": "application/json", **headers}
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def test_list_models_passes_upstream_fields(proxy: RunningProxy) -> None:
    models = await proxy.client().models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    entry = models.data[0].model_dump()
    assert entry["owned_by"] == "fake" and entry["created"] == 1700000000
    assert entry["meta"] == {"n_ctx_train": 4096}


async def test_retrieve_one_model(proxy: RunningProxy) -> None:
    model = await proxy.client().models.retrieve("fake-model")
    assert model.id == "fake-model"
    with pytest.raises(openai.NotFoundError) as caught:
        await proxy.client().models.retrieve("nope")
    assert caught.value.code == "model_not_found"


async def test_health(proxy: RunningProxy) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/health") as resp:
        assert resp.status == 200
        body = await resp.json()
        assert body["status"] == "ok" and body["models"] == 1
        assert body["workers"] == 1 and body["pid"] == os.getpid()


async def test_chat_completion_rewrites_model(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream(model_ids=["/models/llama-3-8b.Q4_K_M.gguf"])
    proxy = await start_proxy([upstream.endpoint(tags=["gpu0"])])
    reply = await proxy.client().chat.completions.create(
        model="llama-3-8b.Q4_K_M:gpu0",
        messages=CHAT,
        temperature=0.5,
        max_tokens=20,
        extra_body={"top_k": 40},
    )
    assert reply.choices[0].message.content == "w0 w1 w2 w3 w4"
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    sent = upstream.fake.generation_requests[-1]
    assert sent.path == "chat/completions"
    assert sent.body["model"] == "/models/llama-3-8b.Q4_K_M.gguf"
    # Everything but model reaches the upstream exactly as the client sent it.
    assert sent.body["top_k"] == 40 and sent.body["temperature"] == 0.5
    assert sent.body["messages"] == CHAT


async def test_completions_and_embeddings(proxy: RunningProxy, upstream: RunningUpstream) -> None:
    client = proxy.client()
    completion = await client.completions.create(model="fake-model", prompt="once", max_tokens=5)
    assert completion.choices[0].text == "w0 w1 w2 w3 w4"
    embedding = await client.embeddings.create(model="fake-model", input=["a", "b"])
    assert len(embedding.data) == 2 and embedding.data[1].embedding == [0.1, 0.2, 0.3]
    assert [r.path for r in upstream.fake.generation_requests] == ["completions", "embeddings"]


async def test_any_post_with_a_model_is_forwarded(
    proxy: RunningProxy, upstream: RunningUpstream
) -> None:
    status, _ = await raw_post(proxy, "/v1/rerank", orjson.dumps({"model": "fake-model", "x": 1}))
    # The fake has no rerank: its answer, whatever it is, comes back through llproxy.
    assert upstream.fake.generation_requests[-1].path == "rerank"
    assert status == 200


async def test_streaming_arrives_chunk_by_chunk(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream(chunks=6, chunk_delay=0.2)
    proxy = await start_proxy([upstream.endpoint()])
    stream = await proxy.client().chat.completions.create(
        model="fake-model", messages=CHAT, stream=True
    )
    arrivals = []
    contents = []
    async for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices:
            contents.append(chunk.choices[0].delta.content)
    assert contents == [f"w{i} " for i in range(6)]
    # Relayed as produced: the first chunk came long before the last (1 s of gaps).
    assert arrivals[-1] - arrivals[0] > 0.5


async def test_stream_fields_and_usage_chunk_pass_untouched(
    proxy: RunningProxy, upstream: RunningUpstream
) -> None:
    stream = await proxy.client().chat.completions.create(
        model="fake-model", messages=CHAT, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    first = chunks[0].model_dump()
    assert first["choices"][0]["delta"]["reasoning_content"] == "think0"
    assert first["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "f"
    assert "x_unknown" in first
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert upstream.fake.generation_requests[-1].body["stream_options"] == {"include_usage": True}


async def test_completion_streaming(proxy: RunningProxy) -> None:
    stream = await proxy.client().completions.create(model="fake-model", prompt="x", stream=True)
    assert [c.choices[0].text async for c in stream] == [f"w{i} " for i in range(5)]


async def test_missing_model_uses_default_model(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    proxy = await start_proxy([upstream.endpoint()], default_model="fake-model")
    status, body = await raw_post(proxy, "/v1/chat/completions", orjson.dumps({"messages": CHAT}))
    assert status == 200 and body["choices"][0]["message"]["content"]
    assert upstream.fake.generation_requests[-1].body["model"] == "fake-model"


@pytest.mark.parametrize(
    ("path", "data", "param"),
    [
        ("/v1/chat/completions", b"{not json", None),
        ("/v1/chat/completions", b"[1, 2]", None),
        ("/v1/chat/completions", b'"text"', None),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        ("/v1/chat/completions", b'{"model": 5, "messages": []}', "model"),
        ("/v1/chat/completions", b'{"model": "fake-model"}', "messages"),
        ("/v1/chat/completions", b'{"model": "fake-model", "messages": []}', "messages"),
        ("/v1/chat/completions", b'{"model": "fake-model", "messages": "hi"}', "messages"),
        ("/v1/chat/completions", b'{"model": "fake-model", "messages": ["hi"]}', "messages[0]"),
        (
            "/v1/chat/completions",
            b'{"model": "fake-model", "messages": [{"content": "x"}]}',
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "fake-model", "messages": [{"role": "user"}], "temperature": 2.5}',
            "temperature",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "fake-model", "messages": [{"role": "user"}], "temperature": "hot"}',
            "temperature",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "fake-model", "messages": [{"role": "user"}], "temperature": -0.1}',
            "temperature",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "fake-model", "messages": [{"role": "user"}], "max_tokens": 0}',
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "fake-model", "messages": [{"role": "user"}], "max_tokens": 1.5}',
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "fake-model", "messages": [{"role": "user"}], "max_tokens": true}',
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "fake-model", "messages": [{"role": "user"}], "stream": "yes"}',
            "stream",
        ),
        ("/v1/completions", b'{"model": "fake-model"}', "prompt"),
        ("/v1/completions", b'{"model": "fake-model", "prompt": {}}', "prompt"),
        ("/v1/completions", b'{"model": "fake-model", "prompt": true}', "prompt"),
        ("/v1/completions", b'{"model": "fake-model", "prompt": 5}', "prompt"),
        ("/v1/completions", b'{"model": "fake-model", "prompt": ["a", {}]}', "prompt"),
        ("/v1/completions", b'{"model": "fake-model", "prompt": [1, true]}', "prompt"),
        (
            "/v1/completions",
            b'{"model": "fake-model", "prompt": "x", "max_tokens": -3}',
            "max_tokens",
        ),
    ],
)
async def test_bad_requests_get_400_and_never_reach_upstream(
    proxy: RunningProxy, upstream: RunningUpstream, path: str, data: bytes, param: str | None
) -> None:
    status, body = await raw_post(proxy, path, data)
    assert status == 400
    assert_openai_error(body, "invalid_request_error")
    assert body["error"]["param"] == param
    assert upstream.fake.generation_requests == []
    # And the daemon keeps serving.
    models = await proxy.client().models.list()
    assert [m.id for m in models.data] == ["fake-model"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/%2E%2E/admin",
        "/v1/chat/%2E%2E/%2E%2E/admin",
        "/v1/chat//completions",
        "/v1/..;/admin",
        "/v1/%252e%252e/admin",
        "/v1/chat/completions/../../admin",
        "/v1/files",
        "/v1/organization/api_keys",
        "/v1/fine_tuning/jobs",
        "/v1/chat/completions%00",
        "/v1/Chat/Completions",
    ],
)
async def test_only_inference_paths_are_forwarded(
    proxy: RunningProxy, upstream: RunningUpstream, path: str
) -> None:
    """Any other POST below /v1/ would go upstream with the endpoint's apikey: 404, and
    nothing is sent."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            URL(f"{proxy.url}{path}", encoded=True),
            json={"model": "fake-model", "messages": CHAT},
        ) as resp,
    ):
        assert resp.status == 404
        assert_openai_error(await resp.json(), "invalid_request_error", "not_found")
    assert upstream.fake.generation_requests == []


async def test_forward_paths_extend_the_allow_list(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    proxy = await start_proxy([upstream.endpoint()], forward_paths=["tokenize", "/x/y/"])
    for path in ("tokenize", "x/y"):
        status, _ = await raw_post(proxy, f"/v1/{path}", orjson.dumps({"model": "fake-model"}))
        assert status == 200
        assert upstream.fake.generation_requests[-1].path == path
    status, _ = await raw_post(proxy, "/v1/detokenize", orjson.dumps({"model": "fake-model"}))
    assert status == 404


async def test_unknown_model_is_404(proxy: RunningProxy, upstream: RunningUpstream) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await proxy.client().chat.completions.create(model="gpt-9", messages=CHAT)
    assert caught.value.code == "model_not_found"
    assert_openai_error(caught.value.body and {"error": caught.value.body}, code="model_not_found")
    assert upstream.fake.generation_requests == []


async def test_unknown_route_and_method_are_openai_shaped(proxy: RunningProxy) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/v2/nothing") as resp:
            assert resp.status == 404
            assert_openai_error(await resp.json(), code="not_found")
        async with session.delete(f"{proxy.url}/v1/models") as resp:
            assert resp.status == 405
            assert_openai_error(await resp.json(), code="method_not_allowed")


async def test_upstream_error_status_and_body_pass_through(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream(fail_status=400)
    proxy = await start_proxy([upstream.endpoint()])
    with pytest.raises(openai.BadRequestError) as caught:
        await proxy.client().chat.completions.create(model="fake-model", messages=CHAT)
    assert caught.value.status_code == 400
    assert caught.value.code == "boom" and "upstream says no" in caught.value.message


async def test_upstream_non_openai_error_is_wrapped(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream(fail_status=503, fail_body=b"<html>overloaded</html>")
    proxy = await start_proxy([upstream.endpoint()])
    status, body = await raw_post(
        proxy, "/v1/chat/completions", orjson.dumps({"model": "fake-model", "messages": CHAT})
    )
    assert status == 503
    assert_openai_error(body, "upstream_error", 503)
    assert "overloaded" in body["error"]["message"]


async def test_dead_upstream_is_502_fast(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream.endpoint()])
    await upstream.server.close()
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        await proxy.client().chat.completions.create(model="fake-model", messages=CHAT)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unreachable"
    assert time.monotonic() - started < 5  # generous: refused connections fail at once


async def test_no_first_byte_in_time_is_504(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream(hang=True)
    proxy = await start_proxy([upstream.endpoint()], timeouts={"first_byte": 0.5})
    with pytest.raises(openai.APIStatusError) as caught:
        await proxy.client().chat.completions.create(model="fake-model", messages=CHAT)
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
    # The hung upstream request was abandoned, not left running.
    await asyncio.wait_for(upstream.fake.disconnected.wait(), 5)


async def test_upstream_dying_mid_stream_ends_with_error_event(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream(chunks=5, die_after_chunks=2)
    proxy = await start_proxy([upstream.endpoint()])
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}/v1/chat/completions",
            json={"model": "fake-model", "messages": CHAT, "stream": True},
        ) as resp,
    ):
        assert resp.status == 200
        raw = await asyncio.wait_for(resp.read(), 10)  # ends cleanly, no hang
    events = [line[6:] for line in raw.decode().split("\n\n") if line.startswith("data: ")]
    assert len(events) == 3
    assert [orjson.loads(e)["choices"][0]["delta"]["content"] for e in events[:2]] == ["w0 ", "w1 "]
    assert_openai_error(orjson.loads(events[2]), "upstream_error", "upstream_unreachable")
    # The SDK surfaces it as an error too.
    stream = await proxy.client().chat.completions.create(
        model="fake-model", messages=CHAT, stream=True
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


async def test_idle_upstream_mid_stream_times_out(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream(chunks=3, chunk_delay=30)
    proxy = await start_proxy([upstream.endpoint()], timeouts={"idle": 0.5})
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}/v1/chat/completions",
            json={"model": "fake-model", "messages": CHAT, "stream": True},
        ) as resp,
    ):
        raw = await asyncio.wait_for(resp.read(), 10)
    last = raw.decode().strip().split("\n\n")[-1]
    assert_openai_error(orjson.loads(last[6:]), "upstream_error", "upstream_timeout")
    await asyncio.wait_for(upstream.fake.disconnected.wait(), 5)


async def test_the_idle_timeout_restarts_with_every_chunk(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    # A stream's one deadline is moved before each wait: 8 chunks 0.2 s apart outlast the
    # 0.5 s idle timeout without meeting it; then the model goes silent at the fifth read
    # and the deadline, moved four times already, still fires.
    upstream = await start_upstream(chunks=8, chunk_delay=0.2)
    proxy = await start_proxy([upstream.endpoint()], timeouts={"idle": 0.5})
    texts = []
    async for chunk in await proxy.client().chat.completions.create(
        model="fake-model", messages=CHAT, stream=True
    ):
        texts += [choice.delta.content or "" for choice in chunk.choices]
    assert "".join(texts) == "".join(f"w{i} " for i in range(8))
    async with chat_request(proxy.url) as resp:
        events = []
        async for line in resp.content:
            if line.startswith(b"data: {"):
                events.append(orjson.loads(line[6:]))
                if len(events) == 4:
                    upstream.fake.chunk_delay = 30  # silent from here on
    assert [e["choices"][0]["delta"]["content"] for e in events[:4]] == [f"w{i} " for i in range(4)]
    assert_openai_error(events[-1], "upstream_error", "upstream_timeout")


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_cancels_upstream(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory, stream: bool
) -> None:
    # Streaming: chunks keep coming slowly; non-streaming: the answer never comes.
    knobs = {"chunks": 100, "chunk_delay": 0.1} if stream else {"first_byte_delay": 60}
    upstream = await start_upstream(**knobs)
    proxy = await start_proxy([upstream.endpoint()])

    async def call() -> None:
        async with chat_request(proxy.url, stream) as resp:
            await resp.content.readany()
            await asyncio.sleep(60)

    task = asyncio.create_task(call())
    await asyncio.wait_for(upstream.fake.got_request.wait(), 10)
    await asyncio.sleep(0.3)
    task.cancel()  # closes the client's connection
    started = time.monotonic()
    await asyncio.wait_for(upstream.fake.disconnected.wait(), 5)
    assert time.monotonic() - started < 1.0
    # Accounted as the client closing the request, not as a server error.
    deadline = time.monotonic() + 5
    while not proxy.state.telemetry.requests and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert proxy.state.telemetry.requests == {("fake-model", "499", "openai"): 1}


async def test_large_bodies_accepted_up_to_the_limit(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    proxy = await start_proxy([upstream.endpoint()], max_request_bytes=4096)
    fits = orjson.dumps(
        {"model": "fake-model", "messages": [{"role": "user", "content": "x" * 3000}]}
    )
    assert (await raw_post(proxy, "/v1/chat/completions", fits))[0] == 200
    over = orjson.dumps(
        {"model": "fake-model", "messages": [{"role": "user", "content": "x" * 5000}]}
    )
    status, body = await raw_post(proxy, "/v1/chat/completions", over)
    assert status == 413
    assert_openai_error(body, "invalid_request_error", "request_too_large")

    async def chunked() -> Any:  # no Content-Length: the limit holds while reading
        yield over

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}/v1/chat/completions", data=chunked()) as resp,
    ):
        assert resp.status == 413
        assert_openai_error(await resp.json(), code="request_too_large")
    assert len(upstream.fake.generation_requests) == 1


async def test_secrets_never_cross(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy(
        [{"url": f"http://127.0.0.1:{upstream.port}/v1", "apikey": "env:TEST_KEY"}]
    )
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/v1/models") as resp:
        assert "sk-up-7" not in await resp.text()
    await proxy.client().chat.completions.create(model="fake-model", messages=CHAT)
    listing, chat = upstream.fake.received[0], upstream.fake.generation_requests[-1]
    # The upstream key goes to the upstream; the client's own key does not.
    assert listing.headers["Authorization"] == "Bearer sk-up-7"
    assert chat.headers["Authorization"] == "Bearer sk-up-7"
    assert all("client-secret" not in str(r.headers) for r in upstream.fake.received)


async def test_replicas_share_load_and_refused_replica_is_skipped(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    first = await start_upstream(name="a", first_byte_delay=0.3)
    second = await start_upstream(name="b", first_byte_delay=0.3)
    proxy = await start_proxy([first.endpoint(), second.endpoint()])
    models = await proxy.client().models.list()
    assert [m.id for m in models.data] == ["fake-model"]  # one model, two replicas

    client = proxy.client()
    replies = await asyncio.gather(
        *(client.chat.completions.create(model="fake-model", messages=CHAT) for _ in range(6))
    )
    served_by = sorted(r.model_dump()["upstream"] for r in replies)
    assert served_by == ["a"] * 3 + ["b"] * 3  # least outstanding splits concurrent work

    await first.server.close()  # refuses connections from now on
    for _ in range(4):
        reply = await client.chat.completions.create(model="fake-model", messages=CHAT)
        assert reply.model_dump()["upstream"] == "b"


async def test_upstream_cookies_are_not_replayed_to_other_clients(
    start_proxy: ProxyFactory, aiohttp_server: Any
) -> None:
    from aiohttp import web

    cookies_seen: list[str | None] = []

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    async def chat(request: web.Request) -> web.Response:
        cookies_seen.append(request.headers.get("Cookie"))
        message = {"role": "assistant", "content": "ok"}
        response = web.json_response({"choices": [{"index": 0, "message": message}]})
        response.set_cookie("session", "for-the-first-client-only")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    # A host name: aiohttp's default jar ignores cookies from bare IP addresses.
    proxy = await start_proxy([{"hostname": "localhost", "port_start": server.port}])
    for _ in range(2):
        status, _ = await raw_post(
            proxy, "/v1/chat/completions", orjson.dumps({"model": "m", "messages": CHAT})
        )
        assert status == 200
    assert cookies_seen == [None, None]


async def test_single_process_metrics_include_discovery(proxy: RunningProxy) -> None:
    await proxy.client().chat.completions.create(model="fake-model", messages=CHAT)
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/metrics") as resp:
        text = await resp.text()
    assert 'llproxy_requests_total{dialect="openai",model="fake-model",status="200"} 1.0' in text
    assert "llproxy_models 1.0" in text and "llproxy_servers 1.0" in text
    assert "llproxy_scan_duration_seconds_count 1.0" in text


async def test_requests_leave_nothing_for_the_cycle_collector(proxy: RunningProxy) -> None:
    """Every request's objects are freed as soon as it ends, by reference counting alone:
    a cycle through an Exchange would hold each answer's body until a collection."""
    client = proxy.client()

    async def one_of_each() -> None:
        await client.chat.completions.create(model="fake-model", messages=CHAT)
        for options in (None, {"include_usage": True}):
            stream = await client.chat.completions.create(
                model="fake-model", messages=CHAT, stream=True, stream_options=options
            )
            assert len([chunk async for chunk in stream]) >= 2

    await one_of_each()  # pools and caches are filled once, not per request
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(5):
            await one_of_each()
        gc.collect()
        ours = [
            type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("llproxy")
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert ours == []
    assert proxy.state.telemetry.requests[("fake-model", "200", "openai")] == 18


async def test_answers_carry_the_name_the_client_asked_for(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream(model_ids=["/models/tiny-llama.gguf"])
    proxy = await start_proxy([upstream.endpoint(tags=["gpu0"])])
    client = proxy.client()
    reply = await client.chat.completions.create(model="tiny-llama:gpu0", messages=CHAT)
    assert reply.model == "tiny-llama:gpu0"
    stream = await client.chat.completions.create(
        model="tiny-llama:gpu0", messages=CHAT, stream=True
    )
    models = {chunk.model async for chunk in stream}
    assert models == {"tiny-llama:gpu0"}
    # The upstream was asked for its own id all the same.
    assert {r.body["model"] for r in upstream.fake.generation_requests} == {
        "/models/tiny-llama.gguf"
    }


@pytest.mark.parametrize("prompt", ["x", ["a", "b"], [1, 2, 3], [[1, 2], [3]], ["a", [1]]])
async def test_every_prompt_shape_openai_allows_is_forwarded(
    proxy: RunningProxy, upstream: RunningUpstream, prompt: Any
) -> None:
    status, _ = await raw_post(
        proxy, "/v1/completions", orjson.dumps({"model": "fake-model", "prompt": prompt})
    )
    assert status == 200
    assert upstream.fake.generation_requests[-1].body["prompt"] == prompt


async def test_audio_uploads_are_forwarded_with_the_model_renamed(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream(model_ids=["org/whisper-small.bin"])
    proxy = await start_proxy([upstream.endpoint(tags=["gpu0"])])
    audio = bytes(range(256)) * 40  # binary, boundary-like bytes included
    transcript = await proxy.client().audio.transcriptions.create(
        model="whisper-small:gpu0", file=("clip.wav", audio, "audio/wav"), language="en"
    )
    assert transcript.text == f"heard {len(audio)} bytes"
    sent = upstream.fake.generation_requests[-1]
    assert sent.path == "audio/transcriptions"
    assert sent.body == {
        "model": "org/whisper-small.bin",
        "language": "en",
        "file": {"filename": "clip.wav", "size": len(audio)},
    }


@pytest.mark.parametrize(
    ("content_type", "data", "status"),
    [
        ("multipart/form-data", b"--x\r\n", 400),  # no boundary
        ("multipart/form-data; boundary=x", b"--x\r\nnot closed", 400),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="model"\r\n\r\nnope\r\n--x--\r\n',
            404,
        ),
    ],
)
async def test_bad_uploads_never_reach_the_upstream(
    proxy: RunningProxy, upstream: RunningUpstream, content_type: str, data: bytes, status: int
) -> None:
    got, body = await raw_post(
        proxy, "/v1/audio/transcriptions", data, **{"Content-Type": content_type}
    )
    assert got == status
    assert_openai_error(body)
    assert upstream.fake.generation_requests == []
