"""Google's Gemini API as a back-end: the fake (tests/fake_gemini.py) is first checked with
the official `google-genai` SDK pointed straight at it; then OpenAI, Anthropic and Ollama
clients reach it through llproxy (text, stream, a tool round trip paired by name and
order, usage equal to the back-end's numbers, errors in each client's shape, a client
leaving), and the back-end's key is looked for everywhere it must not be."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
from google import genai
from google.genai import errors, types

from .conftest import ProxyFactory, RunningProxy, recorded
from .fake_gemini import COUNTED, KEY, MODELS, USAGE, FakeGemini

# google-genai's async client subclasses aiohttp's ClientSession, which aiohttp discourages.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession:DeprecationWarning"
)
SECRET = "sk-up-7"  # what start_proxy's environment holds for env:TEST_KEY
MODEL = "gemini-fake-flash:cloud"
PROMPT = USAGE["promptTokenCount"]
COMPLETION = USAGE["candidatesTokenCount"] + USAGE["thoughtsTokenCount"]
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
async def fake() -> AsyncIterator[FakeGemini]:
    server = FakeGemini()
    await server.start()
    yield server
    await server.close()


def sdk_for(url: str, key: str) -> genai.Client:
    return genai.Client(
        api_key=key, http_options=types.HttpOptions(base_url=url, api_version="v1beta")
    )


async def test_the_fake_speaks_gemini_to_the_official_sdk(fake: FakeGemini) -> None:
    client = sdk_for(fake.url, KEY)
    sdk = client.aio
    said = await sdk.models.generate_content(model="gemini-fake-flash", contents="[think] hi")
    assert said.text == "Hello from Gemini."
    parts = said.candidates[0].content.parts  # type: ignore[index, union-attr]
    assert [p.thought for p in parts] == [True, None]  # type: ignore[union-attr]
    assert said.usage_metadata.thoughts_token_count == 4  # type: ignore[union-attr]
    frames = [
        frame
        async for frame in await sdk.models.generate_content_stream(
            model="gemini-fake-flash", contents="[tool] weather?"
        )
    ]
    assert "".join(f.text or "" for f in frames[:-1]) == "Hello from Gemini."
    calls = frames[-1].function_calls or []
    assert calls[0].name == "get_weather" and calls[0].args == {"city": "Paris"}
    with pytest.raises(errors.ClientError) as limited:
        await sdk.models.generate_content(model="gemini-fake-flash", contents="[429]")
    assert limited.value.code == 429 and limited.value.status == "RESOURCE_EXHAUSTED"
    with pytest.raises(errors.ServerError, match="overloaded"):
        async for _ in await sdk.models.generate_content_stream(
            model="gemini-fake-flash", contents="[midfail]"
        ):
            pass
    listed = [m.name async for m in await sdk.models.list(config={"page_size": 1})]
    assert listed == [m["name"] for m in MODELS]
    wrong = sdk_for(fake.url, "wrong").aio
    with pytest.raises(errors.ClientError) as refused:
        await wrong.models.generate_content(model="gemini-fake-flash", contents="hi")
    assert refused.value.code == 403
    await sdk.aclose()
    await wrong.aclose()


def endpoint(fake: FakeGemini, **extra: Any) -> dict[str, Any]:
    return {"url": fake.url, "dialect": "gemini", "apikey": "env:TEST_KEY", **extra}


@pytest.fixture
async def cloud(start_proxy: ProxyFactory, fake: FakeGemini, tmp_path: Path) -> RunningProxy:
    fake.key = SECRET
    proxy = await start_proxy([endpoint(fake, tags=["cloud"])], state_dir=str(tmp_path / "st"))
    await proxy.rescan()
    return proxy


async def test_listing_keeps_the_models_that_generate(
    cloud: RunningProxy, fake: FakeGemini
) -> None:
    models = cloud.state.registry.models
    assert set(models) == {MODEL, "gemini-fake-pro:cloud"}  # not the embedding model
    assert models[MODEL].context_length == 1048576
    assert models[MODEL].replicas[0].backend == "gemini"
    listed = await cloud.client().models.list()
    assert {m.id: m.model_extra["dialect"] for m in listed.data} == {  # type: ignore[index]
        MODEL: "gemini",
        "gemini-fake-pro:cloud": "gemini",
    }
    asked = [r for r in fake.received if r.path.startswith("/v1beta/models")]
    assert asked and all(r.headers["x-goog-api-key"] == SECRET for r in asked)
    assert all("Authorization" not in r.headers and SECRET not in r.path for r in asked)


async def test_openai_client(cloud: RunningProxy, fake: FakeGemini, tmp_path: Path) -> None:
    client = cloud.client()
    hello = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    made = await client.chat.completions.create(
        model=MODEL,
        messages=hello,  # type: ignore[arg-type]
        max_tokens=50,
        temperature=0.5,
        stop=["END"],
    )
    assert made.choices[0].message.content == "Hello from Gemini."
    assert made.model == MODEL and made.choices[0].finish_reason == "stop"
    assert made.usage is not None and made.usage.prompt_tokens == PROMPT
    assert made.usage.completion_tokens == COMPLETION
    sent = fake.received[-1]
    assert sent.path == "/v1beta/models/gemini-fake-flash:generateContent"
    assert sent.body == {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {"temperature": 0.5, "maxOutputTokens": 50, "stopSequences": ["END"]},
    }
    assert sent.headers["x-goog-api-key"] == SECRET and "Authorization" not in sent.headers

    async with client.chat.completions.stream(
        model=MODEL,
        messages=[{"role": "user", "content": "[think] hi"}],
        reasoning_effort="low",
    ) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "Hello from Gemini."
    assert (
        fake.received[-1].path == "/v1beta/models/gemini-fake-flash:streamGenerateContent?alt=sse"
    )
    thinking = fake.received[-1].body["generationConfig"]["thinkingConfig"]  # type: ignore[index]
    assert thinking == {"thinkingBudget": 2048, "includeThoughts": True}

    ask = [{"role": "user", "content": "[tool] weather in Paris?"}]
    async with client.chat.completions.stream(
        model=MODEL,
        messages=ask,  # type: ignore[arg-type]
        tools=[OPENAI_TOOL],  # type: ignore[list-item]
        tool_choice="required",
    ) as stream:
        called = await stream.get_final_completion()
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    declared = fake.received[-1].body
    assert declared["tools"] == [  # type: ignore[index]
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather",
                    "parametersJsonSchema": WEATHER_SCHEMA,
                }
            ]
        }
    ]
    assert declared["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}  # type: ignore[index]
    follow = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    answered = await client.chat.completions.create(
        model=MODEL,
        messages=follow,  # type: ignore[arg-type]
        tools=[OPENAI_TOOL],  # type: ignore[list-item]
    )
    assert answered.choices[0].message.content == "The weather: sunny"
    # The result is named after the call it answers: Gemini pairs them by name and order.
    contents = fake.received[-1].body["contents"]  # type: ignore[index]
    assert contents[1] == {
        "role": "model",
        "parts": [
            {
                "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                "thoughtSignature": "c2lnLWZha2U=",  # back with the call, from its id
            }
        ],
    }
    assert contents[2] == {
        "role": "user",
        "parts": [{"functionResponse": {"name": "get_weather", "response": {"result": "sunny"}}}],
    }

    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "[429]"}]
        )
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.body["type"] == "RESOURCE_EXHAUSTED"  # type: ignore[index]
    with pytest.raises(openai.InternalServerError) as overloaded:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "[503]"}]
        )
    assert overloaded.value.status_code == 503
    rows = await recorded(tmp_path / "st", "dialect", 6)
    assert rows == [
        {
            "dialect": "openai",
            "requests": 6,
            "prompt_tokens": 4 * PROMPT,
            "completion_tokens": 4 * COMPLETION,
            "cut": 0,
        }
    ]


async def test_anthropic_client(cloud: RunningProxy, tmp_path: Path) -> None:
    sdk = anthropic.AsyncAnthropic(base_url=cloud.url, api_key="client", max_retries=0)
    made = await sdk.messages.create(
        model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    assert made.content[0].text == "Hello from Gemini."  # type: ignore[union-attr]
    assert made.usage.input_tokens == PROMPT and made.usage.output_tokens == COMPLETION
    async with sdk.messages.stream(
        model=MODEL,
        max_tokens=50,
        messages=[{"role": "user", "content": "[think] hi"}],
        thinking={"type": "enabled", "budget_tokens": 1024},
    ) as stream:
        final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Thinking it over."  # type: ignore[union-attr]
    tool = {"name": "get_weather", "input_schema": WEATHER_SCHEMA}
    ask = [{"role": "user", "content": "[tool] weather?"}]
    async with sdk.messages.stream(
        model=MODEL,
        max_tokens=50,
        messages=ask,  # type: ignore[arg-type]
        tools=[tool],  # type: ignore[list-item]
    ) as stream:
        called = await stream.get_final_message()
    use = called.content[-1]
    assert called.stop_reason == "tool_use" and use.type == "tool_use"
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
    with pytest.raises(anthropic.RateLimitError) as limited:
        await sdk.messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "[429]"}]
        )
    assert limited.value.response.headers["retry-after"] == "7"
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        await sdk.messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "[503]"}]
        )
    assert overloaded.value.status_code == 503
    assert overloaded.value.body["error"]["message"] == "The model is overloaded."  # type: ignore[index]
    await sdk.close()
    rows = await recorded(tmp_path / "st", "dialect", 6)
    assert rows == [
        {
            "dialect": "anthropic",
            "requests": 6,
            "prompt_tokens": 4 * PROMPT,
            "completion_tokens": 4 * COMPLETION,
            "cut": 0,
        }
    ]


async def test_ollama_client(cloud: RunningProxy, tmp_path: Path) -> None:
    sdk = ollama.AsyncClient(host=cloud.url, timeout=30)
    said = await sdk.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert said.message.content == "Hello from Gemini."
    assert said.prompt_eval_count == PROMPT and said.eval_count == COMPLETION
    pieces = [
        part.message.content
        async for part in await sdk.chat(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    ]
    assert "".join(p or "" for p in pieces) == "Hello from Gemini."
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
        await sdk.chat(model=MODEL, messages=[{"role": "user", "content": "[503]"}])
    assert overloaded.value.status_code == 503 and "overloaded" in overloaded.value.error
    await sdk.close()
    rows = await recorded(tmp_path / "st", "dialect", 5)
    assert rows == [
        {
            "dialect": "ollama",
            "requests": 5,
            "prompt_tokens": 4 * PROMPT,
            "completion_tokens": 4 * COMPLETION,
            "cut": 0,
        }
    ]


async def test_a_stream_failing_midway_ends_with_the_clients_error_event(
    cloud: RunningProxy,
) -> None:
    with pytest.raises(openai.APIError, match="overloaded"):
        async with cloud.client().chat.completions.stream(
            model=MODEL, messages=[{"role": "user", "content": "[midfail]"}]
        ) as stream:
            await stream.get_final_completion()
    sdk = anthropic.AsyncAnthropic(base_url=cloud.url, api_key="client", max_retries=0)
    with pytest.raises(anthropic.APIStatusError, match="overloaded"):
        async with sdk.messages.stream(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "[midfail]"}]
        ) as events:
            await events.get_final_message()
    await sdk.close()


async def test_a_client_leaving_closes_the_upstream(cloud: RunningProxy, fake: FakeGemini) -> None:
    stream = await cloud.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "[slow]"}], stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    await asyncio.wait_for(fake.disconnected.wait(), 10)


async def test_the_backends_key_is_nowhere_but_its_header(
    cloud: RunningProxy, fake: FakeGemini, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = cloud.client()
    await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    bodies = []
    for marker in ("[429]", "[503]"):
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": marker}]
            )
        bodies.append(failed.value.response.text)
    fake.key = "another"
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    bodies.append(refused.value.response.text)
    await cloud.rescan()
    async with httpx.AsyncClient() as raw:
        metrics = (await raw.get(f"{cloud.url}/metrics")).text
    assert metrics
    for where in (caplog.text, metrics, *bodies):
        assert SECRET not in where
    assert all(SECRET not in r.path for r in fake.received)  # never ?key=


async def test_gemini_client_is_passed_through(
    cloud: RunningProxy, fake: FakeGemini, tmp_path: Path
) -> None:
    """Same dialect: the body goes on as it came (the model is in the path), the answer
    comes back byte for byte but for the model's name; usage from Gemini's own fields."""
    asked = {
        "contents": [{"role": "user", "parts": [{"text": "[think] [tool] hi"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "safetySettings": [{"category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "BLOCK_NONE"}],
        "generationConfig": {"thinkingConfig": {"includeThoughts": True}},
    }
    rename = (b'"modelVersion":"gemini-fake-flash"', b'"modelVersion":"gemini-fake-flash:cloud"')
    async with httpx.AsyncClient(base_url=cloud.url) as raw:
        for method in (":generateContent", ":streamGenerateContent?alt=sse"):
            answer = await raw.post(
                f"/v1beta/models/{MODEL}{method}", json=asked, headers={"x-goog-api-key": "c"}
            )
            assert answer.status_code == 200
            assert fake.received[-1].body == asked
            assert fake.received[-1].path == f"/v1beta/models/gemini-fake-flash{method}"
            assert answer.content == bytes(fake.answers[-1]).replace(*rename)
        array = await raw.post(
            f"/v1beta/models/{MODEL}:streamGenerateContent",
            json=asked,
            headers={"x-goog-api-key": "c"},
        )
    frames = [
        json.loads(e.removeprefix(b"data: "))
        for e in bytes(fake.answers[-1]).replace(*rename).split(b"\r\n\r\n")
        if e
    ]
    assert json.loads(array.content) == frames

    client = genai.Client(api_key="c", http_options=types.HttpOptions(base_url=cloud.url))
    sdk = client.aio
    said = await sdk.models.generate_content(model=MODEL, contents="[tool] weather?")
    part = said.candidates[0].content.parts[-1]  # type: ignore[index, union-attr]
    assert part.function_call.args == {"city": "Paris"}  # type: ignore[union-attr]
    assert part.thought_signature == b"sig-fake"  # intact
    with pytest.raises(errors.ClientError) as limited:
        await sdk.models.generate_content(model=MODEL, contents="[429]")
    assert limited.value.code == 429 and limited.value.status == "RESOURCE_EXHAUSTED"
    await sdk.aclose()
    rows = await recorded(tmp_path / "st", "dialect", 5)
    assert rows == [
        {
            "dialect": "gemini",
            "requests": 5,
            "prompt_tokens": 4 * PROMPT,
            "completion_tokens": 4 * COMPLETION,
            "cut": 0,
        }
    ]


async def test_responses_client(cloud: RunningProxy, tmp_path: Path) -> None:
    client = cloud.client()
    made = await client.responses.create(model=MODEL, input="hi")
    assert made.output_text == "Hello from Gemini."
    async with client.responses.stream(
        model=MODEL,
        input="[tool] weather?",
        tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA}],
    ) as stream:
        final = await stream.get_final_response()
    call = next(item for item in final.output if item.type == "function_call")
    assert call.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    with pytest.raises(openai.RateLimitError) as limited:
        await client.responses.create(model=MODEL, input="[429]")
    assert limited.value.response.headers["retry-after"] == "7"
    rows = await recorded(tmp_path / "st", "dialect", 3)
    assert rows == [
        {
            "dialect": "responses",
            "requests": 3,
            "prompt_tokens": 2 * PROMPT,
            "completion_tokens": 2 * COMPLETION,
            "cut": 0,
        }
    ]


async def test_count_tokens_asks_gemini(cloud: RunningProxy, fake: FakeGemini) -> None:
    client = genai.Client(api_key="c", http_options=types.HttpOptions(base_url=cloud.url))
    counted = await client.aio.models.count_tokens(model=MODEL, contents="hello")
    assert counted.total_tokens == COUNTED
    asked = fake.received[-1]
    assert asked.path == "/v1beta/models/gemini-fake-flash:countTokens"
    assert asked.headers["x-goog-api-key"] == SECRET
    await client.aio.aclose()
