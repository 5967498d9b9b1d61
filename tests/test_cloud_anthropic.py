"""Anthropic's Messages API as a back-end: the fake (tests/fake_anthropic.py) is first
checked with the official `anthropic` SDK pointed straight at it; then OpenAI, Anthropic
and Ollama clients reach it through llproxy (text, stream, a tool round trip, usage equal
to the back-end's numbers, errors in each client's shape, a client leaving), and the
back-end's key is looked for everywhere it must not be."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from llproxy.config import ConfigError, parse_config

from .conftest import ProxyFactory, RunningProxy, recorded
from .dialect_validators import validate_anthropic_stream
from .fake_anthropic import COUNTED, KEY, USAGE, FakeAnthropic

SECRET = "sk-up-7"
MODEL = "claude-fake-large:cloud"
PROMPT = (
    USAGE["input_tokens"] + USAGE["cache_read_input_tokens"] + USAGE["cache_creation_input_tokens"]
)
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
OPENAI_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_SCHEMA},
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    server = FakeAnthropic()
    await server.start()
    yield server
    await server.close()


# --- the fake, checked with the official SDK --------------------------------------------


async def test_the_fake_speaks_anthropic_to_the_official_sdk(fake: FakeAnthropic) -> None:
    sdk = anthropic.AsyncAnthropic(base_url=fake.url, api_key=KEY, max_retries=0)
    hello = [{"role": "user", "content": "hi"}]
    made = await sdk.messages.create(model="claude-fake-large", max_tokens=50, messages=hello)
    assert made.content[0].text == "Hello from Claude."  # type: ignore[union-attr]
    assert made.usage.cache_read_input_tokens == 5
    async with sdk.messages.stream(
        model="claude-fake-large",
        max_tokens=50,
        messages=[{"role": "user", "content": "[think] [tool] weather?"}],
        tools=[{"name": "get_weather", "input_schema": WEATHER_SCHEMA}],
    ) as stream:
        final = await stream.get_final_message()
    kinds = [block.type for block in final.content]
    assert kinds == ["thinking", "text", "tool_use"]
    assert final.content[2].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 7
    with pytest.raises(anthropic.RateLimitError) as limited:
        await sdk.messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "[429]"}]
        )
    assert limited.value.response.headers["retry-after"] == "7"
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        await sdk.messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "[529]"}]
        )
    assert overloaded.value.status_code == 529
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        async with sdk.messages.stream(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "[midfail]"}]
        ) as stream:
            await stream.get_final_message()
    listed = [model.id async for model in sdk.models.list(limit=1)]
    assert listed == ["claude-fake-large", "claude-fake-small"]
    bad = anthropic.AsyncAnthropic(base_url=fake.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        await bad.messages.create(model="m", max_tokens=5, messages=hello)
    await sdk.close()
    await bad.close()


# --- llproxy in front of it ---------------------------------------------------------------


def endpoint(fake: FakeAnthropic, **extra: Any) -> dict[str, Any]:
    return {"url": fake.url, "dialect": "anthropic", "apikey": "env:TEST_KEY", **extra}


@pytest.fixture
async def cloud(start_proxy: ProxyFactory, fake: FakeAnthropic, tmp_path: Path) -> RunningProxy:
    fake.key = SECRET  # what start_proxy's environment holds for env:TEST_KEY
    proxy = await start_proxy([endpoint(fake, tags=["cloud"])], state_dir=str(tmp_path / "st"))
    await proxy.rescan()
    return proxy


def test_config_names_the_dialect_field() -> None:
    with pytest.raises(ConfigError, match=r"endpoints\[0\]\.dialect: must be one of"):
        parse_config({"endpoints": [{"url": "https://x.example", "dialect": "klingon"}]})
    with pytest.raises(ConfigError, match=r"endpoints\[0\]\.dialect: only allowed together"):
        parse_config({"endpoints": [{"hostname": "h", "port_start": 1, "dialect": "anthropic"}]})
    config = parse_config(
        {"endpoints": [{"url": "https://api.anthropic.com/v1", "dialect": "anthropic"}]}
    )
    assert config.endpoints[0].dialect == "anthropic"
    assert config.endpoints[0].base_urls() == ["https://api.anthropic.com"]
    assert parse_config({"endpoints": [{"url": "http://h/v1"}]}).endpoints[0].dialect == "openai"
    gemini = {"url": "https://generativelanguage.googleapis.com/v1beta", "dialect": "gemini"}
    root = parse_config({"endpoints": [gemini]}).endpoints[0].base_urls()
    assert root == ["https://generativelanguage.googleapis.com"]


async def test_listing_reads_the_providers_models_with_their_limits(
    cloud: RunningProxy, fake: FakeAnthropic
) -> None:
    model = cloud.state.registry.models[MODEL]
    assert model.context_length == 200000
    assert model.replicas[0].backend == "anthropic"
    listed = await cloud.client().models.list()
    entries = {m.id: m.model_extra for m in listed.data}
    assert set(entries) == {MODEL, "claude-fake-small:cloud"}
    assert entries[MODEL]["dialect"] == "anthropic"  # type: ignore[index]
    # Paged (the fake has more than one page only when asked for one at a time, so the
    # listing took one page), with the key in x-api-key and nowhere else.
    asked = [r for r in fake.received if r.path.startswith("/v1/models")]
    assert asked and all(r.headers["x-api-key"] == SECRET for r in asked)
    assert all("Authorization" not in r.headers and SECRET not in r.path for r in asked)


async def test_configured_models_are_not_listed_upstream(
    start_proxy: ProxyFactory, fake: FakeAnthropic
) -> None:
    fake.key = SECRET
    proxy = await start_proxy([endpoint(fake, models=["claude-x"])])
    await proxy.rescan()
    assert proxy.state.registry.models["claude-x"].replicas[0].backend == "anthropic"
    assert not fake.received


async def test_openai_client(cloud: RunningProxy, fake: FakeAnthropic, tmp_path: Path) -> None:
    client = cloud.client()
    hello = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    made = await client.chat.completions.create(model=MODEL, messages=hello, max_tokens=50)  # type: ignore[arg-type]
    assert made.choices[0].message.content == "Hello from Claude."
    assert made.model == MODEL and made.choices[0].finish_reason == "stop"
    assert made.usage is not None and made.usage.prompt_tokens == PROMPT
    assert made.usage.completion_tokens == 7
    sent = fake.received[-1]
    assert sent.body == {
        "model": "claude-fake-large",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 50,
        "system": "Be brief.",
    }
    assert sent.headers["x-api-key"] == SECRET and "Authorization" not in sent.headers

    async with client.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": "[think] hi"}]
    ) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "Hello from Claude."
    assert fake.received[-1].body["stream"] is True  # type: ignore[index]

    ask = [{"role": "user", "content": "[tool] weather in Paris?"}]
    async with client.chat.completions.stream(
        model=MODEL,
        messages=ask,
        tools=[OPENAI_TOOL],  # type: ignore[list-item]
    ) as stream:
        called = await stream.get_final_completion()
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert call.function.arguments == '{"city": "Paris"}'  # type: ignore[union-attr]
    follow = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    answered = await client.chat.completions.create(
        model=MODEL, messages=follow, tools=[OPENAI_TOOL]
    )  # type: ignore[arg-type, list-item]
    assert answered.choices[0].message.content == "The weather: sunny"
    turns = fake.received[-1].body["messages"]  # type: ignore[index]
    assert turns[1]["content"][-1] == {
        "type": "tool_use",
        "id": call.id,
        "name": "get_weather",
        "input": {"city": "Paris"},
    }
    assert turns[2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
    }

    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "[429]"}]
        )
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    with pytest.raises(openai.InternalServerError) as overloaded:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "[529]"}]
        )
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["message"] == "Overloaded"  # type: ignore[index]
    rows = await recorded(tmp_path / "st", "dialect", 6)
    assert rows == [
        {
            "dialect": "openai",
            "requests": 6,
            "prompt_tokens": 4 * PROMPT,
            "completion_tokens": 28,
            "cut": 0,
        }
    ]


async def test_anthropic_client_is_passed_through(
    cloud: RunningProxy, fake: FakeAnthropic, tmp_path: Path
) -> None:
    """Same dialect: the request goes on as it came but for the model, with its
    anthropic-version and anthropic-beta; the answer comes back byte for byte but for the
    model; the usage record holds Anthropic's own numbers (cached input included)."""
    headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "prompt-caching-2024-07-31,interleaved-thinking-2025-05-14",
        "x-api-key": "client",
    }
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    asked = {
        "model": MODEL,
        "max_tokens": 50,
        "system": system,
        "messages": [{"role": "user", "content": "[think] hi"}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "metadata": {"user_id": "u-1"},
    }
    async with httpx.AsyncClient(base_url=cloud.url) as raw:
        for stream in (False, True):
            answer = await raw.post(
                "/v1/messages", json={**asked, "stream": stream}, headers=headers
            )
            assert answer.status_code == 200
            received = fake.received[-1]
            assert received.body == {**asked, "stream": stream, "model": "claude-fake-large"}
            for name in ("anthropic-version", "anthropic-beta"):
                assert received.headers[name] == headers[name]
            assert received.headers["x-api-key"] == SECRET
            upstream = bytes(fake.answers[-1])
            assert answer.content == upstream.replace(
                b'"model":"claude-fake-large"', b'"model":"claude-fake-large:cloud"'
            )

    sdk = anthropic.AsyncAnthropic(base_url=cloud.url, api_key="client", max_retries=0)
    made = await sdk.messages.create(
        model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    assert made.content[0].text == "Hello from Claude."  # type: ignore[union-attr]
    assert made.usage.input_tokens == 11 and made.usage.cache_read_input_tokens == 5
    tool = {"name": "get_weather", "input_schema": WEATHER_SCHEMA}
    ask = [{"role": "user", "content": "[think] [tool] weather?"}]
    async with sdk.messages.stream(
        model=MODEL,
        max_tokens=50,
        messages=ask,  # type: ignore[arg-type]
        tools=[tool],  # type: ignore[list-item]
    ) as stream:
        called = await stream.get_final_message()
    thought, use = called.content[0], called.content[-1]
    assert called.stop_reason == "tool_use" and use.type == "tool_use"
    assert thought.type == "thinking" and thought.signature == "sig-fake"
    assert use.input == {"city": "Paris"}
    answered = await sdk.messages.create(
        model=MODEL,
        max_tokens=50,
        tools=[tool],  # type: ignore[list-item]
        messages=[
            *ask,  # type: ignore[list-item]
            {"role": "assistant", "content": called.content},  # type: ignore[typeddict-item]
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "rain"}],
            },
        ],
    )
    assert answered.content[0].text == "The weather: rain"  # type: ignore[union-attr]
    # The thinking block went back with its signature, as Anthropic requires.
    history = fake.received[-1].body["messages"][1]["content"]  # type: ignore[index]
    assert history[0]["type"] == "thinking" and history[0]["signature"] == "sig-fake"

    with pytest.raises(anthropic.RateLimitError) as limited:
        await sdk.messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "[429]"}]
        )
    assert limited.value.response.headers["retry-after"] == "7"
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        await sdk.messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "[529]"}]
        )
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    await sdk.close()
    rows = await recorded(tmp_path / "st", "dialect", 7)
    assert rows == [
        {
            "dialect": "anthropic",
            "requests": 7,
            "prompt_tokens": 5 * PROMPT,
            "completion_tokens": 35,
            "cut": 0,
        }
    ]


async def test_ollama_client(cloud: RunningProxy, fake: FakeAnthropic, tmp_path: Path) -> None:
    sdk = ollama.AsyncClient(host=cloud.url, timeout=30)
    said = await sdk.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert said.message.content == "Hello from Claude."
    assert said.prompt_eval_count == PROMPT and said.eval_count == 7
    pieces = [
        part.message.content
        async for part in await sdk.chat(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    ]
    assert "".join(pieces) == "Hello from Claude." and len([p for p in pieces if p]) > 1
    tool = {"type": "function", "function": OPENAI_TOOL["function"]}
    ask = [{"role": "user", "content": "[tool] weather?"}]
    called = await sdk.chat(model=MODEL, messages=ask, tools=[tool])
    calls = called.message.tool_calls or []
    assert calls and calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == {"city": "Paris"}
    answered = await sdk.chat(
        model=MODEL,
        tools=[tool],
        messages=[
            *ask,
            called.message,
            {"role": "tool", "content": "fog", "tool_name": "get_weather"},
        ],
    )
    assert answered.message.content == "The weather: fog"
    with pytest.raises(ollama.ResponseError) as overloaded:
        await sdk.chat(model=MODEL, messages=[{"role": "user", "content": "[529]"}])
    assert overloaded.value.status_code == 529 and "Overloaded" in overloaded.value.error
    await sdk.close()
    rows = await recorded(tmp_path / "st", "dialect", 5)
    assert rows == [
        {
            "dialect": "ollama",
            "requests": 5,
            "prompt_tokens": 4 * PROMPT,
            "completion_tokens": 28,
            "cut": 0,
        }
    ]


async def test_a_stream_failing_midway_ends_with_the_clients_error_event(
    cloud: RunningProxy,
) -> None:
    client = cloud.client()
    with pytest.raises(openai.APIError, match="Overloaded"):
        async with client.chat.completions.stream(
            model=MODEL, messages=[{"role": "user", "content": "[midfail]"}]
        ) as stream:
            await stream.get_final_completion()
    sdk = anthropic.AsyncAnthropic(base_url=cloud.url, api_key="client", max_retries=0)
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        async with sdk.messages.stream(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "[midfail]"}]
        ) as events:
            await events.get_final_message()
    await sdk.close()


async def test_a_client_leaving_closes_the_upstream(
    cloud: RunningProxy, fake: FakeAnthropic
) -> None:
    stream = await cloud.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "[slow]"}], stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    await asyncio.wait_for(fake.disconnected.wait(), 10)


async def test_the_backends_key_is_nowhere_but_its_header(
    cloud: RunningProxy, fake: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = cloud.client()
    await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    bodies = []
    for marker in ("[429]", "[529]"):
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": marker}]
            )
        bodies.append(failed.value.response.text)
    fake.key = "another"  # the key is refused: what the client and the log hear of it
    with pytest.raises(openai.AuthenticationError) as refused:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    bodies.append(refused.value.response.text)
    await cloud.rescan()  # the listing is refused too
    async with httpx.AsyncClient() as raw:
        metrics = (await raw.get(f"{cloud.url}/metrics")).text
    assert metrics
    for where in (caplog.text, metrics, *bodies):
        assert SECRET not in where
    assert all(SECRET not in r.path for r in fake.received)


async def test_a_passed_through_stream_opened_early_has_one_message_start(
    start_proxy: ProxyFactory, fake: FakeAnthropic
) -> None:
    fake.key = SECRET
    proxy = await start_proxy([endpoint(fake)], timeouts={"stream_keepalive": 0.2})
    await proxy.rescan()
    body = {
        "model": "claude-fake-large",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "[late] [tool] hi"}],
    }
    async with httpx.AsyncClient(base_url=proxy.url) as raw:
        answer = await raw.post("/v1/messages", json=body, headers={"anthropic-version": "x"})
    events = validate_anthropic_stream(answer.content)
    names = [name for name, _ in events]
    assert names.count("message_start") == 1 and names[1] == "ping"
    assert names[-1] == "message_stop"
    # After the stream's own opening, the back-end's events as they came.
    upstream = bytes(fake.answers[-1])
    assert answer.content.endswith(upstream[upstream.index(b"event: ping") :])


async def scan_cli(config: Path, state: Path) -> tuple[int, str, str]:
    """`llproxy scan --json` as a process, while the fake answers in this event loop."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llproxy",
        "scan",
        "--json",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LLPROXY_STATE_DIR": str(state), "ANTHROPIC_API_KEY": SECRET},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_scan_shows_the_dialect_and_a_bad_one_exits_78(
    fake: FakeAnthropic, tmp_path: Path
) -> None:
    fake.key = SECRET
    config = tmp_path / "llproxy.json"
    cloud = {"url": fake.url, "dialect": "anthropic", "apikey": "env:ANTHROPIC_API_KEY"}
    config.write_text(json.dumps({"endpoints": [{**cloud, "tags": ["cloud"]}]}))
    status, out, err = await scan_cli(config, tmp_path)
    assert status == 0, err
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows[MODEL]["dialect"] == "anthropic" and rows[MODEL]["id"] == "claude-fake-large"
    fake.key = "another"  # refused: the warning names the server, never the key
    status, out, err = await scan_cli(config, tmp_path)
    assert status == 0 and "refused the model list: HTTP 401" in err
    assert SECRET not in out + err
    config.write_text(json.dumps({"endpoints": [{**cloud, "dialect": "gemini-ish"}]}))
    status, _, err = await scan_cli(config, tmp_path)
    assert status == 78 and "endpoints[0].dialect: must be one of openai, anthropic" in err


async def test_responses_client(cloud: RunningProxy, tmp_path: Path) -> None:
    client = cloud.client()
    made = await client.responses.create(model=MODEL, input="hi", max_output_tokens=50)
    assert made.output_text == "Hello from Claude."
    assert made.usage is not None and made.usage.input_tokens == PROMPT
    async with client.responses.stream(
        model=MODEL,
        input="[think] [tool] weather?",
        tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA}],
    ) as stream:
        final = await stream.get_final_response()
    call = next(item for item in final.output if item.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    with pytest.raises(openai.InternalServerError) as overloaded:
        await client.responses.create(model=MODEL, input="[529]")
    assert overloaded.value.status_code == 529
    rows = await recorded(tmp_path / "st", "dialect", 3)
    assert rows == [
        {
            "dialect": "responses",
            "requests": 3,
            "prompt_tokens": 2 * PROMPT,
            "completion_tokens": 14,
            "cut": 0,
        }
    ]


# google-genai's async client subclasses aiohttp's ClientSession, which aiohttp discourages.
@pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")
async def test_gemini_client(cloud: RunningProxy, fake: FakeAnthropic, tmp_path: Path) -> None:
    from google import genai
    from google.genai import errors, types

    client = genai.Client(api_key="c", http_options=types.HttpOptions(base_url=cloud.url))
    sdk = client.aio
    said = await sdk.models.generate_content(model=MODEL, contents="hi")
    assert said.text == "Hello from Claude."
    assert said.usage_metadata.prompt_token_count == PROMPT  # type: ignore[union-attr]
    pieces = [
        f.text async for f in await sdk.models.generate_content_stream(model=MODEL, contents="hi")
    ]
    assert "".join(p or "" for p in pieces) == "Hello from Claude."
    weather = types.FunctionDeclaration(name="get_weather", parameters_json_schema=WEATHER_SCHEMA)
    config = types.GenerateContentConfig(
        tools=[types.Tool(function_declarations=[weather])],
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )
    called = await sdk.models.generate_content(
        model=MODEL, contents="[tool] weather?", config=config
    )
    calls = called.function_calls or []
    assert calls and calls[0].name == "get_weather" and calls[0].args == {"city": "Paris"}
    history = [
        types.Content(role="user", parts=[types.Part(text="[tool] weather?")]),
        called.candidates[0].content,  # type: ignore[index]
        types.Content(
            role="user",
            parts=[types.Part.from_function_response(name="get_weather", response={"sky": "hail"})],
        ),
    ]
    answered = await sdk.models.generate_content(model=MODEL, contents=history, config=config)
    assert answered.text == 'The weather: {"sky":"hail"}'
    with pytest.raises(errors.APIError) as overloaded:
        await sdk.models.generate_content(model=MODEL, contents="[529]")
    assert overloaded.value.code == 529 and overloaded.value.status == "UNAVAILABLE"
    await sdk.aclose()
    rows = await recorded(tmp_path / "st", "dialect", 5)
    assert rows == [
        {
            "dialect": "gemini",
            "requests": 5,
            "prompt_tokens": 4 * PROMPT,
            "completion_tokens": 28,
            "cut": 0,
        }
    ]


async def test_routes_other_than_chat_are_refused_before_going_upstream(
    cloud: RunningProxy, fake: FakeAnthropic
) -> None:
    asked = len(fake.received)
    with pytest.raises(openai.BadRequestError, match="answers chat only"):
        await cloud.client().embeddings.create(model=MODEL, input="hi")
    assert len(fake.received) == asked


async def test_count_tokens_asks_anthropic(cloud: RunningProxy, fake: FakeAnthropic) -> None:
    sdk = anthropic.AsyncAnthropic(base_url=cloud.url, api_key="client", max_retries=0)
    counted = await sdk.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert counted.input_tokens == COUNTED
    asked = fake.received[-1]
    assert asked.path == "/v1/messages/count_tokens" and asked.headers["x-api-key"] == SECRET
    assert asked.body["model"] == "claude-fake-large"  # type: ignore[index]
    await sdk.close()
