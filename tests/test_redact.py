"""Secrets kept out of prompts: every key shape, the config's upstream keys and llproxy's
own keys are replaced before a prompt reaches a cloud back-end (the fakes' logs show what
arrived), in the system prompt, messages and tool results, whether the client's request
was passed on as it came (Anthropic to Anthropic) or translated (OpenAI to Gemini); a
local endpoint gets the prompt as written unless it is marked `redact`. The metric and
the access log say how many were replaced, never what."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import orjson
import pytest

from llproxy.config import ConfigError, parse_config
from llproxy.core.redact import PLACEHOLDER, Redactor

from .conftest import ProxyFactory, RunningProxy, scenario_endpoint
from .fake_anthropic import FakeAnthropic
from .fake_gemini import FakeGemini
from .scenario_upstream import ScenarioUpstream

CLIENT_KEY = "static-client-key-0123456789"  # an llproxy key of the config's
UPSTREAM_KEY = "local-upstream-secret-1"  # a local server's key in the config
STORED_KEY = "llp-" + "Qx3_" * 10 + "abc"  # the shape of a key llproxy made
SHAPES = {
    "openai": "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx0123",
    "anthropic": "sk-ant-api03-AbCdEfGhIjKlMnOpQrSt-uvwxyz_012345",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "google": "AIzaSyA-" + "b1C2d3E4f5" * 3 + "_",
    "github": "ghp_" + "a1B2c3D4e5" * 4,
    "slack": "xoxb-123456789012-1234567890123-AbCdEfGhIjKl",
    "pem": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn\n"
    "-----END RSA PRIVATE KEY-----",
}
ALL = {**SHAPES, "client": CLIENT_KEY, "upstream": UPSTREAM_KEY, "stored": STORED_KEY}
# Where each secret goes: the system prompt, the user's text, a tool's result.
SYSTEM = f"Deploy with {SHAPES['aws']} and {SHAPES['pem']}."
ASKED = (
    f"My keys: {SHAPES['openai']}, {SHAPES['anthropic']}, {SHAPES['slack']}; "
    f"llproxy {CLIENT_KEY} and {STORED_KEY}; the server's {UPSTREAM_KEY}."
)
RESULT = f"token={SHAPES['github']} google={SHAPES['google']}"


def test_every_shape_and_known_secret_is_replaced_and_nothing_else() -> None:
    redactor = Redactor([CLIENT_KEY, UPSTREAM_KEY, "short"])
    for name, secret in ALL.items():
        text, count = redactor.text(f"before {secret} after")
        assert (text, count) == (f"before {PLACEHOLDER} after", 1), name
    # A configured secret too short to be told from words is not looked for; words that
    # merely resemble a shape stay.
    ordinary = "a short task-abcdefghijklmnopqrstuvwxyz sk-tiny AKIA1234 AIza ghp_x xoxb-1 llp-x"
    assert redactor.text(ordinary) == (ordinary, 0)
    value = {"messages": [{"content": [{"type": "text", "text": ASKED}]}], "n": 1}
    redacted, count = redactor.value(value)
    assert count == 6 and not any(s in orjson.dumps(redacted).decode() for s in ALL.values())
    assert redactor.value({"plain": ["text"]}) == ({"plain": ["text"]}, 0)
    # An image's encoded bytes are no prompt text: a replacement would only break them.
    image = {
        "source": {"type": "base64", "media_type": "image/png", "data": "QUJD/" + SHAPES["aws"]},
        "image_url": {"url": f"data:image/png;base64,{SHAPES['aws']}"},
    }
    assert redactor.value(image) == (image, 0)


async def test_text_that_only_looks_encoded_is_redacted(
    proxy: RunningProxy, clouds: tuple[FakeAnthropic, FakeGemini]
) -> None:
    """A pasted SSE log starts with "data:" and a tool's input may have a field `data`:
    both are prompt text (they were passed over whole as if they were a file's bytes)."""
    claude, _ = clouds
    sdk = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0)
    use = {"type": "tool_use", "id": "toolu_1", "name": "env", "input": {"data": ASKED}}
    document = {"type": "text", "media_type": "text/plain", "data": RESULT}
    messages: Any = [
        {"role": "user", "content": f'data: {{"key": "{SHAPES["openai"]}"}}'},
        {"role": "assistant", "content": [use]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "done"},
                {"type": "document", "source": document},
            ],
        },
    ]
    tools: Any = [{"name": "env", "input_schema": {"type": "object"}}]
    await sdk.messages.create(
        model="claude-fake-large", max_tokens=50, messages=messages, tools=tools
    )
    await sdk.close()
    sent = claude.received[-1].body
    assert leaked(sent) == []
    assert sent is not None and json.dumps(sent).count(PLACEHOLDER) == 9


def test_config_marks_cloud_endpoints_for_redaction() -> None:
    config = parse_config(
        {
            "endpoints": [
                {"url": "https://api.anthropic.com", "dialect": "anthropic"},
                {"url": "https://g.example", "dialect": "gemini", "redact": False},
                {"url": "http://127.0.0.1:8080/v1"},
                {"hostname": "gpu", "port_start": 8000, "redact": True},
            ]
        }
    )
    assert [e.redact for e in config.endpoints] == [True, False, False, True]
    with pytest.raises(ConfigError, match=r"endpoints\[0\]\.redact: must be a boolean"):
        parse_config({"endpoints": [{"url": "http://h/v1", "redact": "yes"}]})
    with pytest.raises(ConfigError, match=r"endpoints\[0\]\.redact: not for an operator"):
        parse_config({"endpoints": [{"operator": "human", "redact": True}]})


def leaked(body: Any) -> list[str]:
    text = json.dumps(body)
    return [name for name, secret in ALL.items() if json.dumps(secret)[1:-1] in text]


@pytest.fixture
async def clouds() -> AsyncIterator[tuple[FakeAnthropic, FakeGemini]]:
    claude, gemini = FakeAnthropic(key="sk-up-7"), FakeGemini(key="sk-up-7")
    await claude.start()
    await gemini.start()
    yield claude, gemini
    await claude.close()
    await gemini.close()


@pytest.fixture
async def proxy(
    start_proxy: ProxyFactory,
    clouds: tuple[FakeAnthropic, FakeGemini],
    scenario: ScenarioUpstream,
) -> RunningProxy:
    claude, gemini = clouds
    running = await start_proxy(
        [
            {"url": claude.url, "dialect": "anthropic", "apikey": "env:TEST_KEY"},
            {"url": gemini.url, "dialect": "gemini", "apikey": "env:TEST_KEY"},
            scenario_endpoint(scenario, apikey=UPSTREAM_KEY),
        ],
        api_keys=[CLIENT_KEY],
    )
    await running.rescan()
    return running


async def test_an_anthropic_clients_own_request_is_redacted_before_anthropic(
    proxy: RunningProxy,
    clouds: tuple[FakeAnthropic, FakeGemini],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llproxy.access")
    claude, _ = clouds
    sdk = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0)
    use = {"type": "tool_use", "id": "toolu_1", "name": "env", "input": {}}
    messages: Any = [
        {"role": "user", "content": ASKED},
        {"role": "assistant", "content": [use]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": RESULT}],
        },
    ]
    tools: Any = [{"name": "env", "input_schema": {"type": "object"}}]
    async with sdk.messages.stream(
        model="claude-fake-large", max_tokens=50, system=SYSTEM, messages=messages, tools=tools
    ) as events:
        await events.get_final_message()
    await sdk.close()
    sent = claude.received[-1].body
    assert leaked(sent) == []
    assert sent is not None and json.dumps(sent).count(PLACEHOLDER) == 10
    assert sent["system"] == f"Deploy with {PLACEHOLDER} and {PLACEHOLDER}."
    result = sent["messages"][2]["content"][0]["content"]
    assert result == f"token={PLACEHOLDER} google={PLACEHOLDER}"
    (line,) = [r for r in caplog.records if getattr(r, "event", None) == "request"]
    assert line.redacted == 10  # type: ignore[attr-defined]
    assert not leaked(line.__dict__)
    assert b"llproxy_redactions_total 10.0" in await proxy.state.metrics()


async def test_an_openai_clients_request_is_redacted_before_gemini(
    proxy: RunningProxy, clouds: tuple[FakeAnthropic, FakeGemini]
) -> None:
    _, gemini = clouds
    sdk = proxy.client(CLIENT_KEY)
    messages: Any = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "text", "text": ASKED}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "env", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": RESULT},
    ]
    await sdk.chat.completions.create(model="gemini-fake-pro", messages=messages)
    sent = gemini.received[-1].body
    assert leaked(sent) == []
    assert json.dumps(sent).count(PLACEHOLDER) == 10


async def test_a_local_endpoint_gets_the_prompt_as_written_unless_marked(
    proxy: RunningProxy, start_proxy: ProxyFactory, scenario: ScenarioUpstream
) -> None:
    messages: Any = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASKED}]
    await proxy.client(CLIENT_KEY).chat.completions.create(model="fake-model", messages=messages)
    assert scenario.bodies()[-1]["messages"] == messages
    assert b"llproxy_redactions_total 0.0" in await proxy.state.metrics()
    marked = await start_proxy(
        [scenario_endpoint(scenario, apikey=UPSTREAM_KEY, redact=True)], api_keys=[CLIENT_KEY]
    )
    await marked.rescan()
    await marked.client(CLIENT_KEY).chat.completions.create(model="fake-model", messages=messages)
    assert leaked(scenario.bodies()[-1]) == []


async def test_a_token_count_asked_of_a_cloud_is_redacted_too(
    proxy: RunningProxy, clouds: tuple[FakeAnthropic, FakeGemini]
) -> None:
    """Claude Code counts its prompt before each turn: the count is the cloud's, so the
    prompt goes there too."""
    claude, _ = clouds
    sdk = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0)
    await sdk.messages.count_tokens(
        model="claude-fake-large", system=SYSTEM, messages=[{"role": "user", "content": ASKED}]
    )
    await sdk.close()
    asked = claude.received[-1]
    assert asked.path == "/v1/messages/count_tokens"
    assert leaked(asked.body) == [] and PLACEHOLDER in json.dumps(asked.body)
