"""OpenAI Responses clients (the `openai` SDK's `responses` calls) through llproxy to an
OpenAI chat-completions upstream. Every streamed answer is checked on the wire by the
stream validator written from the protocol reference."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
import orjson
import pytest

from .conftest import ProxyFactory, RunningProxy, scenario_endpoint
from .dialect_validators import validate_responses_object, validate_responses_stream
from .scenario_upstream import EXPECTED_TOOLS, ScenarioUpstream
from .wire import Wire

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object"}}


@dataclass
class Agent:
    sdk: openai.AsyncOpenAI
    wire: Wire
    upstream: ScenarioUpstream
    proxy: RunningProxy

    def streamed(self, read_to_end: bool = True) -> list[dict[str, Any]]:
        assert self.wire.last.complete or not read_to_end
        return validate_responses_stream(self.wire.last.body)

    def whole(self) -> dict[str, Any]:
        document = orjson.loads(self.wire.last.body)
        assert isinstance(document, dict)
        return validate_responses_object(document)

    def sent(self) -> dict[str, Any]:
        body = self.upstream.bodies()[-1]
        assert isinstance(body, dict)
        return body

    async def ask(self, stream: bool, **asked: Any) -> Any:
        """A response, streamed through the SDK's helper or not, checked on the wire."""
        asked.setdefault("model", "fake-model")
        if not stream:
            response = await self.sdk.responses.create(**asked)
            self.whole()
            return response
        async with self.sdk.responses.stream(**asked) as events:
            async for _ in events:
                pass
            response = await events.get_final_response()
        self.streamed()
        return response


@pytest.fixture
async def agent(scenario: ScenarioUpstream, start_proxy: ProxyFactory) -> AsyncIterator[Agent]:
    proxy = await start_proxy([scenario_endpoint(scenario)], timeouts={"stream_keepalive": 0.2})
    wire = Wire()
    sdk = openai.AsyncOpenAI(
        base_url=f"{proxy.url}/v1",
        api_key="none",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=wire.transport(httpx2), timeout=30),
    )
    yield Agent(sdk, wire, scenario, proxy)
    await sdk.close()


async def test_a_whole_response(agent: Agent) -> None:
    response = await agent.ask(False, input="hello", instructions="Be brief.", store=True)
    assert response.output_text == "Hello, world!"
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.model == "fake-model" and response.instructions == "Be brief."
    assert [item.type for item in response.output] == ["message"]
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (11, 7, 18)
    assert agent.sent()["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
    ]


@pytest.mark.parametrize("stream", [True, False])
async def test_cached_prompt_tokens_are_reported(agent: Agent, stream: bool) -> None:
    agent.upstream.cached_tokens = 4
    response = await agent.ask(stream, input="hello")
    assert response.usage.input_tokens == 11
    assert response.usage.input_tokens_details.cached_tokens == 4
    if stream:
        [done] = [e for e in agent.streamed() if e["type"] == "response.completed"]
        assert done["response"]["usage"]["input_tokens_details"] == {"cached_tokens": 4}


async def test_a_stream_arrives_delta_by_delta(agent: Agent) -> None:
    deltas = []
    async with agent.sdk.responses.stream(model="fake-model", input="hello") as events:
        async for event in events:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await events.get_final_response()
    events_seen = agent.streamed()
    assert deltas == ["Hello", ", wor", "ld", "!"]
    assert final.output_text == "Hello, world!" and final.usage is not None
    assert final.usage.output_tokens == 7
    assert events_seen[0]["response"]["output"] == []
    assert [e["sequence_number"] for e in events_seen] == list(range(len(events_seen)))


@pytest.mark.parametrize("scenario_name", sorted(EXPECTED_TOOLS))
@pytest.mark.parametrize("stream", [True, False])
async def test_tool_calls(agent: Agent, scenario_name: str, stream: bool) -> None:
    agent.upstream.scenario = scenario_name
    response = await agent.ask(stream, input="weather?", tools=[WEATHER, TIME], tool_choice="auto")
    calls = [item for item in response.output if item.type == "function_call"]
    expected = EXPECTED_TOOLS[scenario_name]
    assert [(c.call_id, c.name, orjson.loads(c.arguments)) for c in calls] == [
        expected[i] for i in sorted(expected)
    ]
    kinds = [item.type for item in response.output]
    if scenario_name == "text_then_tool":
        assert kinds[0] == "message" and response.output_text == "Let me check."
    else:  # a tool-only turn opens no message item
        assert "message" not in kinds
    sent = agent.sent()
    assert sent["tools"][0] == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": WEATHER["parameters"],
            "description": "The weather in a city",
        },
    }


@pytest.mark.parametrize("scenario_name", ["reasoning", "reasoning_alt"])
@pytest.mark.parametrize("stream", [True, False])
async def test_reasoning_and_text(agent: Agent, scenario_name: str, stream: bool) -> None:
    agent.upstream.scenario = scenario_name
    response = await agent.ask(stream, input="2+2?", reasoning={"effort": "high"})
    assert [item.type for item in response.output] == ["reasoning", "message"]
    reasoning = response.output[0]
    assert reasoning.content is not None and reasoning.content[0].text == "Let me think."
    assert response.output_text == "It is 4."
    assert agent.sent()["reasoning_effort"] == "high"


@pytest.mark.parametrize("stream", [True, False])
async def test_length_is_incomplete(agent: Agent, stream: bool) -> None:
    agent.upstream.scenario = "length"
    response = await agent.ask(stream, input="go on", max_output_tokens=5)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "This is a long answer"
    assert agent.sent()["max_tokens"] == 5


async def test_input_items_become_chat_messages(agent: Agent) -> None:
    image = "data:image/png;base64,iVBORw0KGgo="
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    await agent.ask(
        False,
        input=[
            {"role": "developer", "content": "Use tools."},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": image},
                ],
            },
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [{"type": "summary_text", "text": "Hm."}],
            },
            {"type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "12:00"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "It is noon."}],
            },
            {"role": "user", "content": "Thanks."},
        ],
        tools=[TIME],
        tool_choice={"type": "function", "name": "get_time"},
        parallel_tool_calls=False,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema}},
        temperature=0.2,
        metadata={"ticket": "7"},
    )
    sent = agent.sent()
    assert sent["messages"] == [
        {"role": "system", "content": "Use tools."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": image}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Hm.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        {"role": "assistant", "content": "It is noon."},
        {"role": "user", "content": "Thanks."},
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert sent["parallel_tool_calls"] is False and sent["temperature"] == 0.2
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": False},
    }
    assert "metadata" not in sent and "store" not in sent


@pytest.mark.parametrize(
    ("asked", "names"),
    [
        ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [{"type": "input_file", "file_id": "file-1"}],
                    }
                ]
            },
            "input[0].content[0]",
        ),
        ({"input": 7}, "input"),
        ({"input": [{"type": "computer_call"}]}, "input[0].type"),
    ],
)
async def test_what_needs_state_or_hosted_tools_is_a_400(
    agent: Agent, asked: dict[str, Any], names: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await agent.sdk.responses.create(model="fake-model", **asked)
    assert caught.value.param == names
    assert names.removesuffix(".type") in caught.value.message
    assert not agent.upstream.bodies()


async def test_errors(agent: Agent) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await agent.sdk.responses.create(model="nope", input="hi")
    assert missing.value.code == "model_not_found"
    agent.upstream.scenario = "http_error"
    with pytest.raises(openai.InternalServerError):
        await agent.sdk.responses.create(model="fake-model", input="hi")
    agent.upstream.scenario = "fail_mid_stream"
    agent.upstream.fail_after = 3
    deltas = []
    with pytest.raises(openai.APIError) as failed:
        async with agent.sdk.responses.stream(model="fake-model", input="hi") as events:
            async for event in events:
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
    assert deltas == ["Hello", ", wor"] and "upstream" in failed.value.message
    assert "error" in agent.streamed(read_to_end=False)[-1]


async def test_keepalive_comments_while_the_model_is_silent(agent: Agent) -> None:
    agent.upstream.first_chunk_delay = 1.0
    response = await agent.ask(True, input="hi")
    assert response.output_text == "Hello, world!"
    body = agent.wire.last.body
    assert body.count(b": keepalive\n\n") >= 2
    assert body.index(b"response.created") < body.index(b": keepalive")
