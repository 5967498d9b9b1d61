"""Gemini clients (the `google-genai` SDK) through llproxy to an OpenAI chat upstream:
generate_content, its stream, count_tokens, models.list and get, function calling with
automatic calling off, a system instruction, a model named `name:tag`; the stream as SSE
and as one JSON array; auth by x-goog-api-key, ?key= or Bearer, with a key in the query
never logged; errors in Google's shape."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import errors, types

from .conftest import ProxyFactory, RunningProxy, recorded, scenario_endpoint
from .process import create_key
from .scenario_upstream import ScenarioUpstream

# google-genai's async client subclasses aiohttp's ClientSession, which aiohttp discourages.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession:DeprecationWarning"
)
MODEL = "fake-model:lab"  # a name with a colon: the method follows the last one
WEATHER = types.FunctionDeclaration(
    name="get_weather",
    description="The weather in a city",
    parameters_json_schema={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
)


@pytest.fixture
async def proxy(
    start_proxy: ProxyFactory, scenario: ScenarioUpstream, tmp_path: Path
) -> RunningProxy:
    running = await start_proxy(
        [scenario_endpoint(scenario, tags=["lab"])], state_dir=str(tmp_path / "st")
    )
    await running.rescan()
    return running


@pytest.fixture
async def gemini(proxy: RunningProxy) -> AsyncIterator[Any]:
    # As the SDK is given a custom base URL: it calls /v1/models/{model}:generateContent.
    client = genai.Client(api_key="client-key", http_options=types.HttpOptions(base_url=proxy.url))
    yield client.aio
    await client.aio.aclose()


async def test_generate_content_and_its_stream(
    gemini: Any, scenario: ScenarioUpstream, tmp_path: Path
) -> None:
    said = await gemini.models.generate_content(
        model=MODEL,
        contents="hi",
        config=types.GenerateContentConfig(
            system_instruction="Be brief.",
            temperature=0.3,
            max_output_tokens=20,
            stop_sequences=["##"],
        ),
    )
    assert said.text == "Hello, world!"
    assert said.candidates[0].finish_reason == types.FinishReason.STOP
    assert said.usage_metadata.prompt_token_count == 11
    assert said.usage_metadata.candidates_token_count == 7
    assert said.model_version == MODEL
    sent = scenario.bodies()[-1]
    assert sent["model"] == "fake-model"
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert (sent["temperature"], sent["max_tokens"], sent["stop"]) == (0.3, 20, ["##"])
    pieces = [
        frame.text
        async for frame in await gemini.models.generate_content_stream(model=MODEL, contents="hi")
        if frame.text
    ]
    assert "".join(pieces) == "Hello, world!" and len(pieces) > 1
    scenario.scenario = "reasoning"
    thoughts = types.GenerateContentConfig(
        thinking_config=types.ThinkingConfig(include_thoughts=True)
    )
    frames = [
        f
        async for f in await gemini.models.generate_content_stream(
            model=MODEL, contents="2+2?", config=thoughts
        )
    ]
    parts = [p for f in frames for p in (f.candidates[0].content.parts or [])]
    assert [p.text for p in parts if p.thought] == ["Let me ", "think."]
    assert "".join(p.text for p in parts if not p.thought) == "It is 4."
    assert frames[-1].usage_metadata.prompt_token_count == 11
    rows = await recorded(tmp_path / "st", "dialect", 3)
    assert rows == [
        {"dialect": "gemini", "requests": 3, "prompt_tokens": 33, "completion_tokens": 21, "cut": 0}
    ]


async def test_function_calling_round_trip(gemini: Any, scenario: ScenarioUpstream) -> None:
    scenario.scenario = "tools_interleaved"
    config = types.GenerateContentConfig(
        tools=[types.Tool(function_declarations=[WEATHER])],
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        tool_config=types.ToolConfig(
            function_calling_config=types.FunctionCallingConfig(
                mode="ANY", allowed_function_names=["get_weather", "get_time"]
            )
        ),
    )
    said = await gemini.models.generate_content(
        model=MODEL, contents="weather and time?", config=config
    )
    calls = said.function_calls
    assert [(c.name, c.args) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "UTC"}),
    ]
    sent = scenario.bodies()[-1]
    assert sent["tool_choice"] == "required"
    # google-genai 3.6 sends the schema as `parameters_json_schema`, snake case as it is.
    assert sent["tools"][0]["function"]["parameters"]["required"] == ["city"]
    scenario.scenario = "text"
    history = [
        types.Content(role="user", parts=[types.Part(text="weather and time?")]),
        said.candidates[0].content,
        types.Content(
            role="user",
            parts=[
                types.Part.from_function_response(name="get_time", response={"time": "12:00"}),
                types.Part.from_function_response(name="get_weather", response={"sky": "clear"}),
            ],
        ),
    ]
    again = await gemini.models.generate_content(model=MODEL, contents=history, config=config)
    assert again.text == "Hello, world!"
    messages = scenario.bodies()[-1]["messages"]
    calls_sent = messages[1]["tool_calls"]
    ids = {c["function"]["name"]: c["id"] for c in calls_sent}
    # Paired by name, whatever the order of the answers.
    assert messages[2] == {
        "role": "tool",
        "tool_call_id": ids["get_time"],
        "content": '{"time":"12:00"}',
    }
    assert messages[3] == {
        "role": "tool",
        "tool_call_id": ids["get_weather"],
        "content": '{"sky":"clear"}',
    }


async def test_models_list_get_and_count_tokens(gemini: Any) -> None:
    names = [m.name async for m in await gemini.models.list()]
    assert names == [f"models/{MODEL}"]
    model = await gemini.models.get(model=MODEL)
    assert "generateContent" in model.supported_actions
    counted = await gemini.models.count_tokens(model=MODEL, contents="hello there")
    assert counted.total_tokens and counted.total_tokens > 0


async def test_errors_in_googles_shape(gemini: Any, scenario: ScenarioUpstream) -> None:
    with pytest.raises(errors.ClientError) as missing:
        await gemini.models.generate_content(model="no-such-model", contents="hi")
    assert missing.value.code == 404 and missing.value.status == "NOT_FOUND"
    scenario.scenario = "http_error"
    scenario.error_status = 503
    with pytest.raises(errors.ServerError) as failed:
        await gemini.models.generate_content(model=MODEL, contents="hi")
    assert failed.value.code == 503 and failed.value.status == "UNAVAILABLE"
    with pytest.raises(errors.ClientError) as many:
        await gemini.models.generate_content(
            model=MODEL, contents="hi", config=types.GenerateContentConfig(candidate_count=2)
        )
    assert many.value.code == 400 and many.value.status == "INVALID_ARGUMENT"
    scenario.scenario = "fail_mid_stream"
    with pytest.raises(errors.APIError):
        async for _ in await gemini.models.generate_content_stream(model=MODEL, contents="hi"):
            pass


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("tools", True, "tools"),
        ("tools", [{"functionDeclarations": 7}], "tools[0].functionDeclarations"),
        ("systemInstruction", {"parts": True}, "systemInstruction.parts"),
        ("toolConfig", {"functionCallingConfig": {"allowedFunctionNames": 1}}, "toolConfig"),
    ],
)
async def test_a_field_of_the_wrong_type_is_a_400_naming_it(
    proxy: RunningProxy, scenario: ScenarioUpstream, field: str, value: Any, named: str
) -> None:
    # Found by the fuzz test: `"tools": true` was a 500 (a bool iterated).
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], field: value}
    assert await refused(proxy, body, named)
    assert scenario.bodies() == []  # nothing went upstream


async def test_a_function_response_too_deep_to_write_is_a_400(
    proxy: RunningProxy, scenario: ScenarioUpstream
) -> None:
    # Found by the fuzz test: a 500 (the encoder's recursion limit) before.
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    call = {"functionCall": {"name": "f", "args": {"a": 1}}}
    answer = {"functionResponse": {"name": "f", "response": deep}}
    contents = [
        {"role": "user", "parts": [{"text": "hi"}]},
        {"role": "model", "parts": [call]},
        {"role": "user", "parts": [answer]},
    ]
    assert await refused(proxy, {"contents": contents}, "nests deeper")
    assert scenario.bodies() == []


async def refused(proxy: RunningProxy, body: dict[str, Any], says: str) -> bool:
    """Whether llproxy answered the body with a 400 in Google's shape that says `says`."""
    async with httpx.AsyncClient(base_url=proxy.url) as raw:
        answer = await raw.post(
            f"/v1beta/models/{MODEL}:generateContent", json=body, headers={"x-goog-api-key": "k"}
        )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    return bool(error["status"] == "INVALID_ARGUMENT" and says in error["message"])


async def test_a_stream_without_alt_sse_is_one_json_array(proxy: RunningProxy) -> None:
    async with httpx.AsyncClient(base_url=proxy.url) as raw:
        answer = await raw.post(
            f"/v1beta/models/{MODEL}:streamGenerateContent",
            json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
            headers={"x-goog-api-key": "k"},
        )
        sse = await raw.post(
            f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse",
            json={"contents": [{"parts": [{"text": "hi"}]}]},
            headers={"x-goog-api-key": "k"},
        )
    frames = json.loads(answer.content)
    assert isinstance(frames, list) and len(frames) > 2
    assert (
        "".join(p.get("text", "") for f in frames for p in f["candidates"][0]["content"]["parts"])
        == "Hello, world!"
    )
    assert frames[-1]["candidates"][0]["finishReason"] == "STOP"
    assert sse.headers["content-type"].startswith("text/event-stream")
    assert b"[DONE]" not in sse.content and sse.content.startswith(b"data: {")


async def test_keys_by_header_query_or_bearer_and_never_logged(
    start_proxy: ProxyFactory,
    scenario: ScenarioUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = tmp_path / "keys"
    secret = create_key(state, "gem")
    proxy = await start_proxy([scenario_endpoint(scenario)], state_dir=str(state))
    await proxy.rescan()
    caplog.set_level(logging.DEBUG)
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    path = "/v1beta/models/fake-model:generateContent"
    async with httpx.AsyncClient(base_url=proxy.url) as raw:
        assert (
            await raw.post(path, json=body, headers={"x-goog-api-key": secret})
        ).status_code == 200
        assert (await raw.post(f"{path}?key={secret}", json=body)).status_code == 200
        bearer = {"Authorization": f"Bearer {secret}"}
        assert (await raw.post(path, json=body, headers=bearer)).status_code == 200
        refused = await raw.post(path, json=body)
        assert refused.status_code == 401
        assert refused.json()["error"]["status"] == "UNAUTHENTICATED"
        listing = await raw.get("/v1/models", headers={"x-goog-api-key": secret})
        assert listing.json() == {"models": [listing.json()["models"][0]]}
        assert listing.json()["models"][0]["name"] == "models/fake-model"
    # llproxy's own log lines (the test harness's aiohttp and httpx log URLs of their own).
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("llproxy"))
    assert "request POST /v1beta/models/fake-model:generateContent" in ours  # bodies logged
    assert secret not in ours
    assert all(secret not in json.dumps(r["body"]) for r in scenario.requests)


async def test_embed_content(gemini: Any, proxy: RunningProxy, scenario: ScenarioUpstream) -> None:
    embedded = await gemini.models.embed_content(model=MODEL, contents="some text")
    values = embedded.embeddings[0].values
    assert len(values) == scenario.embedding_dims
    # The SDK asks :batchEmbedContents, one request per text.
    assert scenario.bodies("/v1/embeddings")[-1] == {"model": "fake-model", "input": ["some text"]}
    async with httpx.AsyncClient(base_url=proxy.url) as raw:
        one = await raw.post(
            f"/v1beta/models/{MODEL}:embedContent",
            json={"content": {"parts": [{"text": "one"}]}},
            headers={"x-goog-api-key": "k"},
        )
    assert len(one.json()["embedding"]["values"]) == scenario.embedding_dims
    assert scenario.bodies("/v1/embeddings")[-1] == {"model": "fake-model", "input": "one"}
