"""Anthropic Messages clients (the `anthropic` SDK, Claude Code's requests) through llproxy
to an OpenAI chat-completions upstream. Every streamed answer is checked on the wire by
the stream validator written from the protocol reference."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx2
import orjson
import pytest

from .conftest import ProxyFactory, RunningProxy, recorded, scenario_endpoint
from .dialect_validators import validate_anthropic_message, validate_anthropic_stream
from .process import create_key
from .scenario_upstream import EXPECTED_TOOLS, ScenarioUpstream, render_template
from .wire import Wire

HELLO = [{"role": "user", "content": "hello"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
}
TIME = {
    "name": "get_time",
    "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}},
}


@dataclass
class Claude:
    sdk: anthropic.AsyncAnthropic
    wire: Wire
    upstream: ScenarioUpstream
    proxy: RunningProxy

    def streamed(self, read_to_end: bool = True) -> list[tuple[str, dict[str, Any]]]:
        """The last answer's events, checked by the validator (the SDK stops reading at an
        error event: then only what it read is checked)."""
        assert self.wire.last.complete or not read_to_end
        return validate_anthropic_stream(self.wire.last.body)

    def whole(self) -> dict[str, Any]:
        document = orjson.loads(self.wire.last.body)
        assert isinstance(document, dict)
        return validate_anthropic_message(document)

    def sent(self) -> dict[str, Any]:
        """The chat body the upstream received last."""
        body = self.upstream.bodies()[-1]
        assert isinstance(body, dict)
        return body


async def connect(proxy: RunningProxy, upstream: ScenarioUpstream, key: str = "none") -> Claude:
    wire = Wire()
    sdk = anthropic.AsyncAnthropic(
        base_url=proxy.url,
        api_key=key,
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=wire.transport(httpx2), timeout=30),
    )
    return Claude(sdk, wire, upstream, proxy)


@pytest.fixture
async def claude(
    scenario: ScenarioUpstream, start_proxy: ProxyFactory, tmp_path: Path
) -> AsyncIterator[Claude]:
    proxy = await start_proxy(
        [scenario_endpoint(scenario)],
        timeouts={"stream_keepalive": 0.2},
        state_dir=str(tmp_path / "state"),
    )
    client = await connect(proxy, scenario)
    yield client
    await client.sdk.close()


async def test_a_whole_answer(claude: Claude) -> None:
    message = await claude.sdk.messages.create(
        model="fake-model", max_tokens=100, system="Be brief.", messages=HELLO
    )
    claude.whole()
    assert message.id.startswith("msg_") and message.model == "fake-model"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [
        ("text", "Hello, world!")
    ]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 7)
    sent = claude.sent()
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
    ]
    assert sent["max_tokens"] == 100 and "stream" not in sent


async def test_a_stream_arrives_delta_by_delta(claude: Claude) -> None:
    async with claude.sdk.messages.stream(
        model="fake-model", max_tokens=100, messages=HELLO
    ) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    events = claude.streamed()
    assert texts == ["Hello", ", wor", "ld", "!"]
    assert [b.type for b in final.content] == ["text"] and final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (11, 7)
    assert [name for name, _ in events if name != "ping"] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert claude.sent()["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("scenario_name", ["reasoning", "reasoning_alt"])
@pytest.mark.parametrize("stream", [True, False])
async def test_reasoning_becomes_a_thinking_block(
    claude: Claude, scenario_name: str, stream: bool
) -> None:
    claude.upstream.scenario = scenario_name
    thinking = {"type": "enabled", "budget_tokens": 2048}
    if stream:
        async with claude.sdk.messages.stream(
            model="fake-model", max_tokens=100, messages=HELLO, thinking=thinking
        ) as events:
            message = await events.get_final_message()
        claude.streamed()
    else:
        message = await claude.sdk.messages.create(
            model="fake-model", max_tokens=100, messages=HELLO, thinking=thinking
        )
        claude.whole()
    blocks = message.content
    assert [b.type for b in blocks] == ["thinking", "text"]
    assert blocks[0].type == "thinking" and blocks[0].thinking == "Let me think."
    assert blocks[1].type == "text" and blocks[1].text == "It is 4."
    assert claude.sent()["reasoning_effort"] == "low"


@pytest.mark.parametrize("scenario_name", sorted(EXPECTED_TOOLS))
@pytest.mark.parametrize("stream", [True, False])
async def test_tool_calls_in_any_fragment_order(
    claude: Claude, scenario_name: str, stream: bool
) -> None:
    claude.upstream.scenario = scenario_name
    asked: dict[str, Any] = {
        "model": "fake-model",
        "max_tokens": 100,
        "messages": HELLO,
        "tools": [WEATHER, TIME],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": False},
    }
    if stream:
        async with claude.sdk.messages.stream(**asked) as events:
            message = await events.get_final_message()
        claude.streamed()
    else:
        message = await claude.sdk.messages.create(**asked)
        claude.whole()
    calls = [b for b in message.content if b.type == "tool_use"]
    expected = EXPECTED_TOOLS[scenario_name]
    assert [(c.id, c.name, c.input) for c in calls] == [expected[i] for i in sorted(expected)]
    assert message.stop_reason == "tool_use"
    texts = [b.text for b in message.content if b.type == "text"]
    assert texts == (["Let me check."] if scenario_name == "text_then_tool" else [])
    sent = claude.sent()
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather", "get_time"]
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]
    assert sent["tool_choice"] == "auto" and "parallel_tool_calls" not in sent


async def test_a_two_tool_round_trip(claude: Claude) -> None:
    claude.upstream.scenario = "tools_interleaved"
    first = await claude.sdk.messages.create(
        model="fake-model", max_tokens=100, messages=HELLO, tools=[WEATHER, TIME]
    )
    calls = [b for b in first.content if b.type == "tool_use"]
    assert len(calls) == 2
    claude.upstream.scenario = "text"
    results = [
        {"type": "tool_result", "tool_use_id": calls[0].id, "content": "sunny"},
        {
            "type": "tool_result",
            "tool_use_id": calls[1].id,
            "content": [{"type": "text", "text": "12:00"}],
            "is_error": True,
        },
        {"type": "text", "text": "Thanks."},
    ]
    second = await claude.sdk.messages.create(
        model="fake-model",
        max_tokens=100,
        tools=[WEATHER, TIME],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=[
            *HELLO,
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {"role": "user", "content": results},
        ],
    )
    assert second.content[0].type == "text"
    sent = claude.sent()
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool", "tool", "user"]
    assistant = sent["messages"][1]
    assert [
        (c["id"], c["function"]["name"], orjson.loads(c["function"]["arguments"]))
        for c in assistant["tool_calls"]
    ] == [(c.id, c.name, c.input) for c in calls]
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"}
    assert sent["messages"][3]["content"] == "Error: 12:00"
    assert sent["messages"][4] == {"role": "user", "content": "Thanks."}
    assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False


@pytest.mark.parametrize("stream", [True, False])
async def test_length_and_stop_sequence(claude: Claude, stream: bool) -> None:
    async def ask(**extra: Any) -> anthropic.types.Message:
        if not stream:
            message = await claude.sdk.messages.create(
                model="fake-model", max_tokens=5, messages=HELLO, **extra
            )
            claude.whole()
            return message
        async with claude.sdk.messages.stream(
            model="fake-model", max_tokens=5, messages=HELLO, **extra
        ) as events:
            final = await events.get_final_message()
        claude.streamed()
        return final

    claude.upstream.scenario = "length"
    message = await ask()
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    claude.upstream.scenario = "stop_sequence"  # the upstream says which stop matched
    message = await ask(stop_sequences=["###", "END"])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "###"
    assert claude.sent()["stop"] == ["###", "END"]


@pytest.mark.parametrize("stream", [True, False])
async def test_content_is_never_empty(claude: Claude, stream: bool) -> None:
    claude.upstream.scenario = "empty"
    if stream:
        async with claude.sdk.messages.stream(
            model="fake-model", max_tokens=5, messages=HELLO
        ) as events:
            message = await events.get_final_message()
        claude.streamed()
    else:
        message = await claude.sdk.messages.create(model="fake-model", max_tokens=5, messages=HELLO)
        claude.whole()
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", "")]


@pytest.mark.parametrize("stream", [True, False])
async def test_cached_prompt_tokens_are_counted_apart(claude: Claude, stream: bool) -> None:
    claude.upstream.cached_tokens = 4  # of the 11 prompt tokens
    if stream:
        async with claude.sdk.messages.stream(
            model="fake-model", max_tokens=5, messages=HELLO
        ) as events:
            await events.get_final_message()
        [usage] = [data["usage"] for name, data in claude.streamed() if name == "message_delta"]
    else:
        await claude.sdk.messages.create(model="fake-model", max_tokens=5, messages=HELLO)
        usage = claude.whole()["usage"]
    assert usage["input_tokens"] == 7 and usage["cache_read_input_tokens"] == 4
    assert usage["output_tokens"] == 7 and usage["cache_creation_input_tokens"] == 0


async def test_count_tokens_counts_the_templated_prompt_or_estimates_its_text(
    claude: Claude,
) -> None:
    upstream = claude.upstream
    # llama.cpp: the chat template rendered by the server, then that text tokenized.
    counted = await claude.sdk.messages.count_tokens(
        model="fake-model", messages=HELLO, tools=[WEATHER]
    )
    [rendered] = upstream.bodies("/apply-template")
    assert rendered["messages"] == [{"role": "user", "content": "hello"}]
    assert rendered["tools"][0]["function"]["name"] == "get_weather"
    prompt = render_template(rendered)
    assert upstream.bodies("/tokenize")[-1] == {"content": prompt, "add_special": True}
    assert counted.input_tokens == len(prompt.split())
    # vLLM: no /apply-template; its /tokenize takes the messages and templates them.
    upstream.template_enabled, upstream.vllm_tokenize = False, True
    vllm = await claude.sdk.messages.count_tokens(
        model="fake-model", messages=HELLO, tools=[WEATHER]
    )
    asked = upstream.bodies("/tokenize")[-1]
    assert asked["model"] == "fake-model" and asked["messages"] == rendered["messages"]
    assert vllm.input_tokens == len(prompt.split())
    # No tokenizer upstream, or a model nobody serves: an estimate from the texts only
    # (50 turns of "hi" are ~38 tokens of text in ~1,000 bytes of JSON), never a 404.
    upstream.tokenize_enabled = upstream.template_enabled = False
    turns = [{"role": ("user", "assistant")[i % 2], "content": "hi"} for i in range(49)]
    estimated = await claude.sdk.messages.count_tokens(model="fake-model", messages=turns)
    unknown = await claude.sdk.messages.count_tokens(model="claude-nothing", messages=turns)
    assert estimated.input_tokens == unknown.input_tokens == len("hi\n" * 49) // 4
    assert not upstream.bodies()  # counting never generates


async def test_an_old_llama_cpp_without_apply_template_gives_an_estimate(
    claude: Claude,
) -> None:
    # /tokenize reads only `content`: no tokens for messages is no count of 0.
    claude.upstream.template_enabled = False
    counted = await claude.sdk.messages.count_tokens(model="fake-model", messages=HELLO * 40)
    assert counted.input_tokens == len("\n".join(["hello"] * 40)) // 4


async def test_models_in_anthropic_shape(claude: Claude) -> None:
    page = await claude.sdk.models.list()
    assert [m.id for m in page.data] == ["fake-model"]
    assert page.data[0].type == "model" and page.first_id == "fake-model"
    one = await claude.sdk.models.retrieve("fake-model")
    assert one.id == "fake-model" and one.display_name == "fake-model"
    with pytest.raises(anthropic.NotFoundError) as caught:
        await claude.sdk.models.retrieve("nope")
    assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    # The same route without anthropic-version is OpenAI's.
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{claude.proxy.url}/v1/models") as resp,
    ):
        assert (await resp.json())["object"] == "list"


async def post(proxy: RunningProxy, path: str, body: Any, **headers: str) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}{path}", data=data, headers=headers) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


def assert_anthropic_error(body: Any, kind: str) -> None:
    assert body["type"] == "error" and set(body) == {"type", "error"}
    assert body["error"]["type"] == kind and body["error"]["message"]


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"model": "fake-model", "messages": HELLO}, "max_tokens"),
        ({"model": "fake-model", "messages": HELLO, "max_tokens": "9"}, "max_tokens"),
        ({"model": "fake-model", "max_tokens": 9}, "messages"),
        ({"model": 7, "messages": HELLO, "max_tokens": 9}, "model"),
        ({"model": "fake-model", "max_tokens": 9, "messages": [{"role": "x"}]}, "messages.0"),
        ({"model": "fake-model", "max_tokens": 9, "messages": HELLO, "system": 5}, "system"),
        (b"{not json", "JSON"),
        ([1, 2], "object"),
    ],
)
async def test_bad_requests_get_anthropic_errors_and_go_nowhere(
    claude: Claude, body: Any, names: str
) -> None:
    status, answer = await post(claude.proxy, "/v1/messages", body)
    assert status == 400
    assert_anthropic_error(answer, "invalid_request_error")
    assert names in answer["error"]["message"]
    assert not claude.upstream.bodies()


async def test_sdk_exceptions_for_each_status(claude: Claude) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        await claude.sdk.messages.create(model="nope", max_tokens=5, messages=HELLO)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    claude.upstream.scenario = "http_error"
    with pytest.raises(anthropic.InternalServerError) as failed:
        await claude.sdk.messages.create(model="fake-model", max_tokens=5, messages=HELLO)
    assert "scenario error 500" in failed.value.message
    assert failed.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    claude.upstream.error_status = 400  # an upstream's OpenAI error, rewrapped, status kept
    with pytest.raises(anthropic.BadRequestError) as refused:
        async with claude.sdk.messages.stream(
            model="fake-model", max_tokens=5, messages=HELLO
        ) as events:
            await events.get_final_message()
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


async def test_a_failure_mid_stream_is_an_error_event(claude: Claude) -> None:
    claude.upstream.scenario = "fail_mid_stream"
    claude.upstream.fail_after = 3
    texts: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with claude.sdk.messages.stream(
            model="fake-model", max_tokens=5, messages=HELLO
        ) as events:
            async for text in events.text_stream:
                texts.append(text)
    assert texts == ["Hello", ", wor"]
    names = [name for name, _ in claude.streamed(read_to_end=False)]
    assert names[-1] == "error" and "message_stop" not in names
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]


async def test_pings_while_the_model_is_silent(claude: Claude) -> None:
    claude.upstream.first_chunk_delay = 1.0  # five keepalive periods of the test config
    async with claude.sdk.messages.stream(
        model="fake-model", max_tokens=5, messages=HELLO
    ) as events:
        final = await events.get_final_message()
    names = [name for name, _ in claude.streamed()]
    assert names[0] == "message_start" and names[1] == "ping"
    assert names.index("content_block_start") > names.count("ping") >= 2
    assert final.content[0].type == "text" and final.usage.output_tokens == 7


async def test_claude_code_requests(claude: Claude) -> None:
    """What the CLI sends (dialects.md 1.12): a HEAD probe, system entries inside
    messages, adaptive thinking, beta fields and headers, a 2020-12 schema, 64,000
    max_tokens, `?beta=true`, the billing header hash in the system prompt."""
    claude.upstream.n_ctx_train = 32768  # a llama.cpp listing: its /props gives n_ctx 8192
    await claude.proxy.rescan()
    async with (
        aiohttp.ClientSession() as session,
        session.head(f"{claude.proxy.url}/") as resp,
    ):
        assert resp.status == 200
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"command": {"type": "string"}},
        "required": ["command"],
        "additionalProperties": False,
    }
    body = {
        "model": "fake-model",
        "max_tokens": 64000,
        "stream": True,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; cch=9a8b7c;"},
            {
                "type": "text",
                "text": "You are Claude Code.",
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "ls", "cache_control": {}}]},
            {"role": "system", "content": "Reminder: be careful."},
        ],
        "tools": [{"name": "Bash", "description": "Run a command", "input_schema": schema}],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "user_abc_account__session_1"},
    }
    headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
        "x-api-key": "anything",
        "Content-Type": "application/json",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{claude.proxy.url}/v1/messages?beta=true", data=orjson.dumps(body), headers=headers
        ) as resp,
    ):
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        raw = await resp.read()
    validate_anthropic_stream(raw)
    sent = claude.sent()
    # One leading system message: local chat templates refuse one anywhere else.
    assert sent["messages"] == [
        {
            "role": "system",
            "content": "x-anthropic-billing-header: cc_version=2.1; cch=00000;\n"
            "You are Claude Code.\n\nReminder: be careful.",
        },
        {"role": "user", "content": "ls"},
    ]
    assert sent["tools"][0]["function"]["parameters"] == schema
    # The scenario's server has an 8,192-token context: 64,000 is lowered to what is left.
    assert 7000 < sent["max_tokens"] < 8192
    assert sent["user"] == "user_abc_account__session_1"
    for unknown in ("thinking", "context_management", "output_config", "metadata"):
        assert unknown not in sent
    # The /anthropic prefix serves the same.
    status, answer = await post(
        claude.proxy, "/anthropic/v1/messages", {**body, "stream": False}, **headers
    )
    assert status == 200 and validate_anthropic_message(answer)


async def test_keys_limits_and_usage_through_anthropic(
    scenario: ScenarioUpstream, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    secret = create_key(state, "claude-user")
    proxy = await start_proxy(
        [scenario_endpoint(scenario)], state_dir=str(state), rate_limit="3 per minute"
    )
    nobody = await connect(proxy, scenario, key="wrong-key-0123456789")
    with pytest.raises(anthropic.AuthenticationError) as refused:
        await nobody.sdk.messages.create(model="fake-model", max_tokens=5, messages=HELLO)
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    await nobody.sdk.close()
    assert not scenario.bodies()

    claude = await connect(proxy, scenario, key=secret)  # sent as x-api-key
    async with claude.sdk.messages.stream(
        model="fake-model", max_tokens=5, messages=HELLO
    ) as events:
        await events.get_final_message()
    claude.streamed()
    status, _ = await post(
        proxy,
        "/v1/messages",
        {"model": "fake-model", "max_tokens": 5, "messages": HELLO},
        Authorization=f"Bearer {secret}",
    )
    assert status == 200
    await claude.sdk.messages.create(model="fake-model", max_tokens=5, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError) as limited:
        await claude.sdk.messages.create(model="fake-model", max_tokens=5, messages=HELLO)
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert limited.value.response.headers["retry-after"]
    await claude.sdk.close()
    # The stream's usage record holds the upstream's own numbers.
    rows = await recorded(state, "dialect", 3)
    assert rows == [
        {
            "dialect": "anthropic",
            "requests": 3,
            "prompt_tokens": 33,
            "completion_tokens": 21,
            "cut": 0,
        }
    ]


async def test_a_client_leaving_closes_the_upstream(claude: Claude) -> None:
    claude.upstream.chunk_delay = 0.5
    async with claude.sdk.messages.stream(
        model="fake-model", max_tokens=5, messages=HELLO
    ) as events:
        async for text in events.text_stream:
            assert text == "Hello"
            break
    await asyncio.wait_for(claude.upstream.disconnected.wait(), 10)
