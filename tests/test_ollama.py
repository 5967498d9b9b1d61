"""Ollama clients (the `ollama` Python client, what Open WebUI and Copilot call) through
llproxy to an OpenAI chat-completions upstream. Every streamed answer is checked on the
wire by the NDJSON validator written from the protocol reference."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import ollama
import orjson
import pytest

from .conftest import ProxyFactory, RunningProxy, scenario_endpoint
from .dialect_validators import (
    validate_ollama_chat,
    validate_ollama_generate,
    validate_ollama_stream,
)
from .scenario_upstream import EXPECTED_TOOLS, ScenarioUpstream
from .wire import Wire

HELLO = [{"role": "user", "content": "hello"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
PNG = (  # a one-pixel image
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


@dataclass
class Webui:
    sdk: ollama.AsyncClient
    wire: Wire
    upstream: ScenarioUpstream
    proxy: RunningProxy

    def lines(self, kind: str) -> list[dict[str, Any]]:
        assert self.wire.last.complete
        return validate_ollama_stream(self.wire.last.body, kind)  # type: ignore[arg-type]

    def whole(self) -> dict[str, Any]:
        document = orjson.loads(self.wire.last.body)
        assert isinstance(document, dict)
        return document

    def sent(self, path: str = "/v1/chat/completions") -> dict[str, Any]:
        body = self.upstream.bodies(path)[-1]
        assert isinstance(body, dict)
        return body

    async def get(self, path: str, method: str = "GET") -> tuple[int, str, bytes]:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, f"{self.proxy.url}{path}") as resp,
        ):
            return resp.status, resp.content_type, await resp.read()


@pytest.fixture
async def webui(scenario: ScenarioUpstream, start_proxy: ProxyFactory) -> AsyncIterator[Webui]:
    scenario.n_ctx_train = 32768  # a llama.cpp server: /props says n_ctx 8192
    proxy = await start_proxy([scenario_endpoint(scenario)])
    wire = Wire()
    sdk = ollama.AsyncClient(host=proxy.url, transport=wire.transport(httpx), timeout=30)
    yield Webui(sdk, wire, scenario, proxy)
    await sdk.close()


async def test_what_clients_probe_first(webui: Webui) -> None:
    for method in ("GET", "HEAD"):
        status, _, body = await webui.get("/", method)
        assert status == 200 and body == (b"Ollama is running" if method == "GET" else b"")
    status, media, body = await webui.get("/api/version")
    assert status == 200 and media == "application/json"
    version = tuple(int(part) for part in orjson.loads(body)["version"].split("."))
    assert version >= (0, 6, 4)


async def test_list_show_and_ps(webui: Webui) -> None:
    listed = await webui.sdk.list()
    assert [m.model for m in listed.models] == ["fake-model"]
    assert listed.models[0].modified_at is not None and listed.models[0].details is not None
    shown = await webui.sdk.show("fake-model")
    info = shown.modelinfo or {}
    assert info["general.basename"] == "fake-model"
    # An OpenAI-style listing names no architecture: none is made up ("unknown" was).
    assert "general.architecture" not in info and not any(".context" in k for k in info)
    assert shown.parameters == "num_ctx 8192"
    assert shown.capabilities is not None and "completion" in shown.capabilities
    # Older clients send `name`; `:latest` means the model without it.
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{webui.proxy.url}/api/show", json={"name": "fake-model:latest"}) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["model_info"]["general.basename"] == "fake-model"
    running = await webui.sdk.ps()
    assert [m.model for m in running.models] == ["fake-model"]
    with pytest.raises(ollama.ResponseError) as missing:
        await webui.sdk.show("nope")
    assert missing.value.status_code == 404 and "not found" in missing.value.error


async def test_chat_streamed_and_whole(webui: Webui) -> None:
    parts = [part async for part in await webui.sdk.chat("fake-model", HELLO, stream=True)]
    lines = webui.lines("chat")
    assert [p.message.content for p in parts[:-1]] == ["Hello", ", wor", "ld", "!"]
    last = parts[-1]
    assert last.done and last.done_reason == "stop"
    assert (last.prompt_eval_count, last.eval_count) == (11, 7)
    assert lines[-1]["total_duration"] >= lines[-1]["eval_duration"] >= 0
    assert webui.wire.last.body.count(b"\n") == len(parts)
    whole = await webui.sdk.chat("fake-model:latest", HELLO, stream=False)
    validate_ollama_chat(webui.whole())
    assert whole.message.content == "Hello, world!" and whole.model == "fake-model:latest"
    assert "stream" not in webui.sent()


@pytest.mark.parametrize("scenario_name", sorted(EXPECTED_TOOLS))
@pytest.mark.parametrize("stream", [True, False])
async def test_chat_with_tools(webui: Webui, scenario_name: str, stream: bool) -> None:
    webui.upstream.scenario = scenario_name
    if stream:
        parts = [
            p async for p in await webui.sdk.chat("fake-model", HELLO, tools=[WEATHER], stream=True)
        ]
        webui.lines("chat")
        calls = [c for p in parts for c in p.message.tool_calls or ()]
    else:
        whole = await webui.sdk.chat("fake-model", HELLO, tools=[WEATHER])
        validate_ollama_chat(webui.whole())
        calls = list(whole.message.tool_calls or ())
    expected = EXPECTED_TOOLS[scenario_name]
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        expected[i][1:] for i in sorted(expected)
    ]
    assert webui.sent()["tools"] == [WEATHER]


async def test_a_tool_round_trip_keeps_call_ids(webui: Webui) -> None:
    await webui.sdk.chat(
        "fake-model",
        [
            *HELLO,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"function": {"name": "get_time", "arguments": {}}},
                ],
            },
            {"role": "tool", "tool_name": "get_time", "content": "12:00"},
            {"role": "tool", "tool_name": "get_weather", "content": "sunny"},
        ],
    )
    messages = webui.sent()["messages"]
    calls = {c["function"]["name"]: c for c in messages[1]["tool_calls"]}
    assert orjson.loads(calls["get_weather"]["function"]["arguments"]) == {"city": "Paris"}
    assert messages[2] == {
        "role": "tool",
        "tool_call_id": calls["get_time"]["id"],
        "content": "12:00",
    }
    assert messages[3]["tool_call_id"] == calls["get_weather"]["id"]


@pytest.mark.parametrize("stream", [True, False])
async def test_thinking(webui: Webui, stream: bool) -> None:
    webui.upstream.scenario = "reasoning"
    if stream:
        parts = [
            p async for p in await webui.sdk.chat("fake-model", HELLO, think=True, stream=True)
        ]
        webui.lines("chat")
        thinking = "".join(p.message.thinking or "" for p in parts)
        content = "".join(p.message.content or "" for p in parts)
    else:
        whole = await webui.sdk.chat("fake-model", HELLO, think=True)
        validate_ollama_chat(webui.whole())
        thinking, content = whole.message.thinking or "", whole.message.content or ""
    assert (thinking, content) == ("Let me think.", "It is 4.")
    # think false: the reasoning stays out of the answer.
    whole = await webui.sdk.chat("fake-model", HELLO, think=False)
    assert whole.message.thinking is None and whole.message.content == "It is 4."


async def test_options_format_and_images(webui: Webui) -> None:
    await webui.sdk.chat(
        "fake-model",
        [{"role": "user", "content": "what is it?", "images": [PNG]}],
        format="json",
        options={
            "num_predict": 50,
            "temperature": 0.1,
            "top_k": 3,
            "top_p": 0.9,
            "seed": 7,
            "stop": ["END"],
            "repeat_penalty": 1.1,
            "presence_penalty": 0.5,
            "num_ctx": 4096,
            "num_gpu": 1,
        },
    )
    sent = webui.sent()
    assert sent["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is it?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            ],
        }
    ]
    assert sent["max_tokens"] == 50 and sent["temperature"] == 0.1 and sent["top_k"] == 3
    assert sent["top_p"] == 0.9 and sent["seed"] == 7 and sent["stop"] == ["END"]
    assert sent["repeat_penalty"] == 1.1 and sent["presence_penalty"] == 0.5
    assert "num_ctx" not in sent and "num_gpu" not in sent
    assert sent["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    await webui.sdk.chat("fake-model", HELLO, format=schema)
    assert webui.sent()["response_format"]["json_schema"]["schema"] == schema


async def test_generate(webui: Webui) -> None:
    parts = [
        p
        async for p in await webui.sdk.generate(
            "fake-model", "hello", system="Be brief.", stream=True
        )
    ]
    webui.lines("generate")
    assert "".join(p.response for p in parts) == "Hello, world!" and parts[-1].done
    assert webui.sent()["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
    ]
    whole = await webui.sdk.generate("fake-model", "def f(", suffix="return 1", raw=True)
    validate_ollama_generate(webui.whole())
    assert whole.response == "Hello, world!"
    sent = webui.sent("/v1/completions")
    assert (sent["prompt"], sent["suffix"]) == ("def f(", "return 1")
    webui.upstream.scenario = "length"
    cut = await webui.sdk.generate("fake-model", "go on", options={"num_predict": 3})
    assert cut.done_reason == "length"


async def test_load_and_unload_are_answered_here(webui: Webui) -> None:
    loaded = await webui.sdk.generate("fake-model", "")
    assert loaded.done and loaded.done_reason == "load"
    unloaded = await webui.sdk.chat("fake-model", [], keep_alive=0)
    assert unloaded.done_reason == "unload"
    with pytest.raises(ollama.ResponseError) as missing:
        await webui.sdk.generate("nope", "")
    assert missing.value.status_code == 404
    assert not webui.upstream.bodies()


async def test_embeddings(webui: Webui) -> None:
    embedded = await webui.sdk.embed("fake-model", ["one", "two"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 8
    assert embedded.prompt_eval_count == 11
    assert webui.sent("/v1/embeddings")["input"] == ["one", "two"]
    old = await webui.sdk.embeddings("fake-model", "one")
    assert list(old.embedding) == list(embedded.embeddings[0])


async def test_errors(webui: Webui) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        await webui.sdk.chat("nope", HELLO)
    assert missing.value.status_code == 404 and missing.value.error == "model 'nope' not found"
    for call in (webui.sdk.pull("x"), webui.sdk.delete("x"), webui.sdk.copy("a", "b")):
        with pytest.raises(ollama.ResponseError) as refused:
            await call
        assert refused.value.status_code == 501 and "not supported" in refused.value.error
    webui.upstream.scenario = "http_error"
    with pytest.raises(ollama.ResponseError) as failed:
        await webui.sdk.chat("fake-model", HELLO)
    assert failed.value.status_code == 500 and "scenario error 500" in failed.value.error
    webui.upstream.scenario = "fail_mid_stream"
    webui.upstream.fail_after = 3
    seen = []
    with pytest.raises(ollama.ResponseError) as cut:
        async for part in await webui.sdk.chat("fake-model", HELLO, stream=True):
            seen.append(part.message.content)
    assert seen == ["Hello", ", wor"] and "upstream" in cut.value.error
    lines = validate_ollama_stream(webui.wire.last.body, "chat")
    assert set(lines[-1]) == {"error"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{webui.proxy.url}/api/chat", data=b"{nope") as resp,
    ):
        assert resp.status == 400 and set(await resp.json()) == {"error"}
