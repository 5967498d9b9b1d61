"""Fallback chains: an alias naming an ordered list of models falls to the next when one
fails before the client has a byte, and never widens what a key may reach."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import anthropic
import ollama
import openai
import pytest

from llproxy.config import ConfigError, parse_config
from llproxy.core.fallback import retry_after
from llproxy.ui.logs import render_request

from .conftest import ProxyFactory, RunningProxy, RunningUpstream, UpstreamFactory, recorded
from .operator_client import open_desk
from .process import create_key

HELLO = [{"role": "user", "content": "hi"}]


async def _pair(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory, **top: object
) -> tuple[RunningUpstream, RunningUpstream, RunningProxy]:
    first = await start_upstream(model_ids=["first"])
    second = await start_upstream(model_ids=["second"])
    proxy = await start_proxy(
        [first.endpoint(), second.endpoint()],
        aliases={"smart": ["ghost", "first", "second"]},
        **top,
    )
    return first, second, proxy


async def _chat(proxy: RunningProxy, model: str = "smart") -> tuple[int, str, str]:
    """Status, the x-llproxy-model header and the text of a chat with the raw response."""
    raw = await proxy.client().chat.completions.with_raw_response.create(
        model=model,
        messages=HELLO,  # type: ignore[arg-type]
    )
    completion = raw.parse()
    return (
        raw.status_code,
        raw.headers["x-llproxy-model"],
        completion.choices[0].message.content or "",
    )


async def test_the_first_model_answers_and_the_header_says_so(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    first, second, proxy = await _pair(start_upstream, start_proxy)
    status, served, text = await _chat(proxy)
    assert (status, served) == (200, "first") and text
    assert len(first.fake.generation_requests) == 1 and not second.fake.generation_requests


@pytest.mark.parametrize("status", [500, 503, 408])
async def test_a_server_error_falls_to_the_next_model(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory, status: int
) -> None:
    first, second, proxy = await _pair(start_upstream, start_proxy)
    first.fake.fail_status = status
    assert (await _chat(proxy))[:2] == (200, "second")
    assert len(first.fake.generation_requests) == 1
    assert len(second.fake.generation_requests) == 1
    sums = proxy.state.telemetry.in_flight
    assert sums.get("first", 0) == 0 and sums.get("second", 0) == 0


async def test_an_unreachable_model_falls_to_the_next(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    first, second, proxy = await _pair(start_upstream, start_proxy)
    await first.server.close()  # still listed; its connections are refused
    assert (await _chat(proxy))[:2] == (200, "second")
    assert len(second.fake.generation_requests) == 1


async def test_a_bad_request_does_not_fall_over(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    first, second, proxy = await _pair(start_upstream, start_proxy)
    first.fake.fail_status = 400
    with pytest.raises(openai.BadRequestError) as refused:
        await _chat(proxy)
    assert refused.value.response.headers["x-llproxy-model"] == "first"
    assert not second.fake.generation_requests


async def test_the_last_models_failure_reaches_the_client(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    first, second, proxy = await _pair(start_upstream, start_proxy)
    first.fake.fail_status = second.fake.fail_status = 502
    with pytest.raises(openai.APIStatusError) as failed:
        await _chat(proxy)
    assert failed.value.status_code == 502
    assert failed.value.response.headers["x-llproxy-model"] == "second"
    # Each model once: attempts are bounded.
    assert len(first.fake.generation_requests) == len(second.fake.generation_requests) == 1


async def test_a_429s_retry_after_keeps_the_model_out_while_it_lasts(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    first, second, proxy = await _pair(start_upstream, start_proxy)
    first.fake.fail_status = 429
    first.fake.fail_headers = {"Retry-After": "600"}
    assert (await _chat(proxy))[:2] == (200, "second")
    first.fake.fail_status = None  # it would answer now, but asked for ten minutes
    assert (await _chat(proxy))[:2] == (200, "second")
    assert len(first.fake.generation_requests) == 1
    assert len(second.fake.generation_requests) == 2
    # Asked by its own name, the model is still reached: the wait is for chains.
    assert (await _chat(proxy, "first"))[:2] == (200, "first")
    # With every model of the chain waiting, the client hears when to come back.
    second.fake.fail_status = 429
    second.fake.fail_headers = {"Retry-After": "30"}
    with pytest.raises(openai.RateLimitError):
        await _chat(proxy)
    with pytest.raises(openai.InternalServerError) as busy:
        await _chat(proxy)
    assert busy.value.status_code == 503
    assert 0 < int(busy.value.response.headers["Retry-After"]) <= 30
    assert len(second.fake.generation_requests) == 3


async def test_a_429_that_is_over_lets_the_model_answer_again(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    first, second, proxy = await _pair(start_upstream, start_proxy)
    first.fake.fail_status = 429
    first.fake.fail_headers = {"retry-after-ms": "1"}
    assert (await _chat(proxy))[:2] == (200, "second")
    first.fake.fail_status = None  # and a millisecond is over by the next request
    assert (await _chat(proxy))[:2] == (200, "first")
    assert len(second.fake.generation_requests) == 1


async def test_a_chain_never_carries_a_key_to_a_model_it_may_not_use(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    limited = create_key(state, "limited", "--models", "first")
    only_second = create_key(state, "second-only", "--models", "second")
    first, second, proxy = await _pair(start_upstream, start_proxy, state_dir=str(state))
    first.fake.fail_status = 503
    with pytest.raises(openai.InternalServerError) as failed:
        await proxy.client(limited).chat.completions.create(
            model="smart",
            messages=HELLO,  # type: ignore[arg-type]
        )
    assert failed.value.status_code == 503
    assert not second.fake.generation_requests
    # A key for the second model only may not use the chain at all: its first is not its.
    with pytest.raises(openai.PermissionDeniedError):
        await proxy.client(only_second).chat.completions.create(
            model="smart",
            messages=HELLO,  # type: ignore[arg-type]
        )
    assert not second.fake.generation_requests


async def test_the_anthropic_sdk_falls_over_too(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    first, second, proxy = await _pair(start_upstream, start_proxy)
    first.fake.fail_status = 500
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    async with claude:
        raw = await claude.messages.with_raw_response.create(
            model="smart",
            max_tokens=20,
            messages=HELLO,  # type: ignore[arg-type]
        )
        async with claude.messages.stream(
            model="smart",
            max_tokens=20,
            messages=HELLO,  # type: ignore[arg-type]
        ) as stream:
            text = await stream.get_final_text()
    assert raw.headers["x-llproxy-model"] == "second" and (await raw.parse()).content
    assert text
    assert len(second.fake.generation_requests) == 2


def test_retry_after_reads_seconds_dates_and_milliseconds() -> None:
    assert retry_after({"Retry-After": "12"}) == 12
    assert retry_after({"retry-after-ms": "1500"}) == 1.5
    assert retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT"}, now=1445412480) == 30
    assert retry_after({"Retry-After": "soon"}) is None
    assert retry_after({"Retry-After": "-5"}) is None
    assert retry_after({"Retry-After": "999999"}) == 3600
    assert retry_after({}) is None


@pytest.mark.parametrize(
    ("aliases", "message"),
    [
        ({"smart": []}, "aliases.smart: a fallback chain must name at least one model"),
        ({"smart": ["a", ""]}, "aliases.smart[1]: must not be empty"),
        ({"smart": ["a", 3]}, "aliases.smart[1]"),
    ],
)
def test_a_bad_chain_names_its_field(aliases: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config({"aliases": aliases})


async def test_no_first_byte_in_time_falls_to_the_next_model(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    first, second, proxy = await _pair(start_upstream, start_proxy, timeouts={"first_byte": 0.5})
    first.fake.hang = True
    assert (await asyncio.wait_for(_chat(proxy), 20))[:2] == (200, "second")
    await asyncio.wait_for(first.fake.disconnected.wait(), 10)  # the silent one was let go
    assert len(second.fake.generation_requests) == 1


async def test_nothing_is_tried_again_after_the_first_byte(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    first, second, proxy = await _pair(start_upstream, start_proxy)
    first.fake.die_after_chunks = 2  # the stream breaks after the client had its start
    text = ""
    with pytest.raises(openai.APIError):
        stream = await proxy.client().chat.completions.create(
            model="smart",
            messages=HELLO,  # type: ignore[arg-type]
            stream=True,
        )
        async for chunk in stream:
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert len(first.fake.generation_requests) == 1
    assert not second.fake.generation_requests


async def test_a_client_leaving_during_fallback_stops_every_attempt(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    first, second, proxy = await _pair(start_upstream, start_proxy)
    first.fake.hang = True
    asking = asyncio.create_task(_chat(proxy))
    await asyncio.wait_for(first.fake.got_request.wait(), 10)
    asking.cancel()
    await asyncio.wait_for(first.fake.disconnected.wait(), 10)
    await asyncio.sleep(0.3)  # room for a wrong second attempt to arrive
    assert not second.fake.generation_requests


async def test_the_usage_record_names_the_model_that_answered(
    start_upstream: UpstreamFactory,
    start_proxy: ProxyFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llproxy.access")
    first, second, proxy = await _pair(start_upstream, start_proxy)
    first.fake.fail_status = 503
    await _chat(proxy)
    lines = [r.__dict__ for r in caplog.records if r.__dict__.get("event") == "request"]
    assert [(line["model"], line["served"]) for line in lines] == [("smart", "second")]
    assert "smart = second" in render_request(lines[0]).plain
    assert len(second.fake.generation_requests) == 1
    rows = await recorded(tmp_path / "state", "model", 1)
    assert [(r["model"], r["requests"]) for r in rows] == [("second", 1)]
    metrics = (await proxy.state.metrics()).decode()
    answered = [line for line in metrics.splitlines() if line.startswith("llproxy_requests_total")]
    assert answered and all('model="second"' in line for line in answered)
    assert 'llproxy_requests_in_flight{model="first"} 0.0' in metrics


async def test_the_ollama_and_gemini_faces_fall_over_too(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    first, second, proxy = await _pair(start_upstream, start_proxy)
    first.fake.fail_status = 502
    webui = ollama.AsyncClient(host=proxy.url)
    chat = await webui.chat("smart", HELLO)
    await webui.close()
    assert chat.model == "smart" and chat.message.content
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}/v1beta/models/smart:generateContent",
            json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
        ) as resp,
    ):
        assert resp.status == 200 and resp.headers["x-llproxy-model"] == "second"
        assert (await resp.json())["candidates"]
    assert len(first.fake.generation_requests) == len(second.fake.generation_requests) == 2


async def test_an_operators_fallback_to_a_chain_falls_over(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    first = await start_upstream(model_ids=["first"])
    second = await start_upstream(model_ids=["second"])
    first.fake.fail_status = 500
    quick = {"operator": "human", "tags": ["quick"], "queue_timeout": 0.3, "fallback": "smart"}
    desk = await open_desk(
        start_proxy,
        tmp_path / "state",
        [first.endpoint(), second.endpoint(), quick],
        aliases={"smart": ["first", "second"]},
    )
    answer = await asyncio.wait_for(
        desk.client().chat.completions.create(
            model="human:quick",
            messages=HELLO,  # type: ignore[arg-type]
        ),
        20,
    )
    assert answer.choices[0].message.content
    assert len(first.fake.generation_requests) == len(second.fake.generation_requests) == 1
