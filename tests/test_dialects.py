"""What every dialect shares: keys, limits, usage records, metrics, aliases, loop refusal
and client-disconnect cancellation run once, in the same code, whatever the client
speaks; each dialect only shapes the answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import ollama
import openai
import orjson
import pytest

from .conftest import ProxyFactory, RunningProxy, free_port_block, recorded, scenario_endpoint
from .dialect_validators import (
    validate_anthropic_stream,
    validate_ollama_stream,
    validate_responses_stream,
)
from .process import create_key
from .scenario_upstream import ScenarioUpstream

HELLO = [{"role": "user", "content": "hello"}]

# One request per dialect, as its clients send it; `error` tells the dialect's error shape.
DIALECTS: dict[str, dict[str, Any]] = {
    "openai": {
        "path": "/v1/chat/completions",
        "body": {"model": "fake-model", "messages": HELLO},
    },
    "anthropic": {
        "path": "/v1/messages",
        "body": {"model": "fake-model", "messages": HELLO, "max_tokens": 50},
    },
    "responses": {"path": "/v1/responses", "body": {"model": "fake-model", "input": "hello"}},
    "ollama": {
        "path": "/api/chat",
        "body": {"model": "fake-model", "messages": HELLO, "stream": False},
    },
}


def _openai_stream(raw: bytes) -> None:
    assert raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw


STREAM_VALIDATORS: dict[str, Callable[[bytes], Any]] = {
    "openai": _openai_stream,
    "anthropic": validate_anthropic_stream,
    "responses": validate_responses_stream,
    "ollama": lambda raw: validate_ollama_stream(raw, "chat"),
}


def error_message(dialect: str, body: Any) -> str:
    """The message of an error in the dialect's own shape (and checks that shape)."""
    if dialect == "anthropic":
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
        return str(body["error"]["message"])
    if dialect == "ollama":
        assert set(body) == {"error"} and isinstance(body["error"], str)
        return str(body["error"])
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return str(body["error"]["message"])


async def send(
    proxy: RunningProxy,
    dialect: str,
    stream: bool = False,
    model: str = "fake-model",
    **headers: str,
) -> tuple[int, dict[str, str], bytes]:
    spec = DIALECTS[dialect]
    body = {**spec["body"], "model": model, "stream": stream}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}{spec['path']}", json=body, headers=headers) as resp,
    ):
        raw = await resp.read()
    if stream and resp.status == 200:
        STREAM_VALIDATORS[dialect](raw)
    return resp.status, dict(resp.headers), raw


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
async def test_keys_limits_usage_and_metrics_in_every_dialect(
    scenario: ScenarioUpstream, start_proxy: ProxyFactory, tmp_path: Path, dialect: str
) -> None:
    state = tmp_path / "state"
    secret = create_key(state, "someone")
    proxy = await start_proxy(
        [scenario_endpoint(scenario)], state_dir=str(state), rate_limit="3 per minute"
    )
    status, _, body = await send(proxy, dialect)
    assert status == 401 and "key" in error_message(dialect, orjson.loads(body))
    status, _, body = await send(proxy, dialect, Authorization="Bearer wrong-0123456789abcdef")
    assert status == 401 and error_message(dialect, orjson.loads(body))
    assert not scenario.bodies()
    auth = {"Authorization": f"Bearer {secret}"}
    assert (await send(proxy, dialect, **auth))[0] == 200
    assert (await send(proxy, dialect, stream=True, **auth))[0] == 200
    assert (await send(proxy, dialect, **auth))[0] == 200
    status, headers, body = await send(proxy, dialect, **auth)
    assert status == 429 and int(headers["Retry-After"]) > 0
    assert "rate limit" in error_message(dialect, orjson.loads(body)).lower()
    assert len(scenario.bodies()) == 3
    # Each record carries the dialect and the upstream's own numbers, streamed or not.
    rows = await recorded(state, "dialect", 3)
    assert rows == [
        {"dialect": dialect, "requests": 3, "prompt_tokens": 33, "completion_tokens": 21, "cut": 0}
    ]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy.url}/metrics", headers=auth) as resp,
    ):
        metrics = await resp.text()
    served = f'llproxy_requests_total{{dialect="{dialect}",model="fake-model",status="200"}} 3.0'
    assert served in metrics


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
async def test_a_client_leaving_a_stream_closes_the_upstream(
    scenario: ScenarioUpstream, start_proxy: ProxyFactory, dialect: str
) -> None:
    scenario.chunk_delay = 0.5
    proxy = await start_proxy([scenario_endpoint(scenario)])
    spec = DIALECTS[dialect]
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}{spec['path']}", json={**spec["body"], "stream": True}) as resp,
    ):
        assert resp.status == 200
        while b"Hello" not in await resp.content.readany():
            pass
    await asyncio.wait_for(scenario.disconnected.wait(), 10)
    assert scenario.disconnect_paths == ["/v1/chat/completions"]


async def test_aliases_in_every_dialect_and_listing(
    scenario: ScenarioUpstream, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await start_proxy(
        [scenario_endpoint(scenario)],
        aliases={"claude-*": "fake-model", "gpt-4o": "fake-model", "ghost": "missing-model"},
    )
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    async with claude:
        message = await claude.messages.create(
            model="claude-sonnet-4-5-20250929", max_tokens=20, messages=HELLO
        )
        listed = await claude.models.list()
    assert message.model == "claude-sonnet-4-5-20250929"
    assert scenario.bodies()[-1]["model"] == "fake-model"
    assert sorted(m.id for m in listed.data) == ["fake-model", "gpt-4o"]
    gpt = proxy.client()
    answer = await gpt.responses.create(model="gpt-4o", input="hi")
    assert answer.model == "gpt-4o" and answer.output_text == "Hello, world!"
    assert sorted(m.id for m in (await gpt.models.list()).data) == ["fake-model", "gpt-4o"]
    webui = ollama.AsyncClient(host=proxy.url)
    tags = await webui.list()
    assert sorted(m.model or "" for m in tags.models) == ["fake-model", "gpt-4o"]
    chat = await webui.chat("claude-3-haiku", HELLO)
    assert chat.model == "claude-3-haiku" and chat.message.content == "Hello, world!"
    with pytest.raises(ollama.ResponseError) as missing:  # an alias of nothing
        await webui.chat("ghost", HELLO)
    assert missing.value.status_code == 404
    await webui.close()


async def test_an_alias_never_widens_a_key(
    scenario: ScenarioUpstream, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    limited = create_key(state, "limited", "--models", "claude-*,other-*")
    proxy = await start_proxy(
        [scenario_endpoint(scenario)], state_dir=str(state), aliases={"claude-*": "fake-model"}
    )
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=limited, max_retries=0)
    async with claude:
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            await claude.messages.create(model="claude-opus", max_tokens=5, messages=HELLO)
        assert refused.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
        assert (await claude.models.list()).data == []
    assert not scenario.bodies()


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
async def test_a_request_that_passed_here_is_refused_with_508(
    scenario: ScenarioUpstream, start_proxy: ProxyFactory, dialect: str
) -> None:
    proxy = await start_proxy([scenario_endpoint(scenario)], instance="a1b2c3")
    status, _, body = await send(proxy, dialect, Via="1.1 other, 1.1 llproxy-a1b2c3")
    assert status == 508 and "loop" in error_message(dialect, orjson.loads(body))
    assert not scenario.bodies()
    # What goes upstream names this llproxy, after the hops before it.
    status, headers, _ = await send(proxy, dialect, Via="1.1 other")
    assert status == 200 and headers["X-Llproxy-Instance"] == "a1b2c3"
    assert scenario.requests[-1]["headers"]["Via"] == "1.1 other, 1.1 llproxy-a1b2c3"


async def test_llproxy_never_discovers_itself(
    scenario: ScenarioUpstream, tmp_path: Path, start_llproxy: Any
) -> None:
    """A scan range that covers llproxy's own port (11434 is in the default ranges, and a
    user may give llproxy any port) finds only the real servers, scan after scan."""
    port = int(scenario.url.rsplit(":", 1)[1])
    own = free_port_block(1)
    config = tmp_path / "llproxy.json"
    endpoints = [
        {"hostname": "127.0.0.1", "port_start": own, "port_end": own},
        {"hostname": "127.0.0.1", "port_start": port, "port_end": port},
    ]
    config.write_text(json.dumps({"endpoints": endpoints}))
    process = await start_llproxy(
        "--config", str(config), "--workers", "1", "--scan-interval", "1", "-v", port=own
    )

    def listings() -> int:
        return len([r for r in scenario.requests if r["path"] == "/v1/models"])

    async def rescans(count: int) -> None:
        start = listings()
        while listings() < start + count:
            await asyncio.sleep(0.1)

    await asyncio.wait_for(rescans(3), 30)  # three rescans since it serves, each reaching itself
    client = openai.AsyncOpenAI(base_url=f"{process.url}/v1", api_key="x", max_retries=0)
    async with client:
        models = await client.models.list()
        answer = await client.chat.completions.create(model="fake-model", messages=HELLO)  # type: ignore[arg-type]
    assert [m.id for m in models.data] == ["fake-model"]
    assert answer.choices[0].message.content == "Hello, world!"
    # Found itself, it would count two servers and probe its own /v1/model.
    assert "scan: 1 servers, 1 models" in process.output
    assert "2 servers" not in process.output and "GET /v1/model " not in process.output
