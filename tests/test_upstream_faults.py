"""Broken upstream answers through every client dialect: a fast subset of the upstream-fault
matrix (`make chaos` runs all of it against a real daemon), and the official SDKs meeting
a malformed answer and an upstream that answers in the other form."""

from __future__ import annotations

import gc
import types
from typing import Any

import aiohttp
import anthropic
import ollama
import pytest

from llproxy.core.shape import answer_problem, chunk_problem

from .conftest import ProxyFactory, RunningProxy, scenario_endpoint
from .fake_upstream import FAULTS, FaultyUpstream, HostileUpstream
from .scenario_upstream import EXPECTED_TOOLS, ScenarioUpstream
from .upstream_faults import DIALECTS, TEXT, ask, judge

MiB = 1024 * 1024
# Every fault once streamed and once not, the dialects taken in turn.
CASES = [
    (fault, DIALECTS[(2 * n + stream) % len(DIALECTS)], bool(stream))
    for n, fault in enumerate(FAULTS)
    for stream in (0, 1)
]


@pytest.fixture
async def faulty(aiohttp_server: Any, start_proxy: ProxyFactory) -> RunningProxy:
    server = await aiohttp_server(FaultyUpstream(hang_for=5).app())
    endpoint = {"hostname": "127.0.0.1", "port_start": server.port}
    return await start_proxy([endpoint], timeouts={"first_byte": 1, "idle": 1})


@pytest.mark.parametrize(("fault", "dialect", "stream"), CASES)
async def test_a_broken_answer_is_an_error_in_the_clients_dialect(
    faulty: RunningProxy, fault: str, dialect: str, stream: bool
) -> None:
    async with aiohttp.ClientSession() as session:
        outcome = await ask(session, faulty.url, dialect, fault, stream)
        assert judge(dialect, fault, stream, outcome) is None
        # The proxy serves on: a good answer right after.
        after = await ask(session, faulty.url, dialect, "other_form", stream)
        assert judge(dialect, "other_form", stream, after) is None


async def test_the_anthropic_sdk_gets_a_502_for_wrong_typed_fields(faulty: RunningProxy) -> None:
    sdk = anthropic.AsyncAnthropic(base_url=faulty.url, api_key="k", max_retries=0)
    async with sdk:
        for fault in ("tool_calls_string", "content_number", "usage_not_int", "cut"):
            with pytest.raises(anthropic.APIStatusError) as failed:
                await sdk.messages.create(
                    model=f"fault-{fault}",
                    max_tokens=64,
                    messages=[{"role": "user", "content": "hi"}],
                )
            assert failed.value.status_code == 502
            assert "malformed" in failed.value.message or "JSON" in failed.value.message
        # Streamed, a chunk of the wrong type ends the stream with an error event.
        with pytest.raises(anthropic.APIStatusError, match="content is not a string"):
            async with sdk.messages.stream(
                model="fault-content_number",
                max_tokens=64,
                messages=[{"role": "user", "content": "hi"}],
            ) as events:
                await events.get_final_message()
    async with aiohttp.ClientSession() as session, session.get(f"{faulty.url}/metrics") as got:
        metrics = await got.text()
    malformed = [line for line in metrics.splitlines() if 'kind="malformed"' in line]
    assert malformed and malformed[0].endswith(" 5.0"), malformed


async def test_the_openai_sdk_gets_the_form_it_asked_for(faulty: RunningProxy) -> None:
    sdk = faulty.client()
    messages: Any = [{"role": "user", "content": "hi"}]
    # The upstream streams to a request for a whole answer: collected into one.
    whole = await sdk.chat.completions.create(model="fault-other_form", messages=messages)
    assert whole.choices[0].message.content == TEXT
    assert whole.usage is not None and whole.usage.prompt_tokens == 5
    # The upstream answers JSON to a stream request: a stream of one chunk.
    stream = await sdk.chat.completions.create(
        model="fault-other_form", messages=messages, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    # The usage chunk the client did not ask for stays hidden.
    assert all(chunk.usage is None for chunk in chunks)


async def test_the_ollama_client_gets_the_form_it_asked_for(faulty: RunningProxy) -> None:
    messages = [{"role": "user", "content": "hi"}]
    async with ollama.AsyncClient(host=faulty.url, timeout=30) as sdk:
        whole = await sdk.chat(model="fault-other_form", messages=messages, stream=False)
        assert whole.message.content == TEXT
        parts = await sdk.generate(model="fault-other_form", prompt="hi", stream=True)
        assert "".join([part.response async for part in parts]) == TEXT
        with pytest.raises(ollama.ResponseError) as failed:
            await sdk.chat(model="fault-message_not_object", messages=messages, stream=False)
        assert failed.value.status_code == 502


async def test_a_relayed_stream_drops_and_counts_chunks_that_are_not_json(
    faulty: RunningProxy,
) -> None:
    sdk = faulty.client()
    messages: Any = [{"role": "user", "content": "hi"}]
    for model in ("fault-invalid_json", "fault-nan"):
        # include_usage: the relay passes the stream as it is (no chunk hidden).
        stream = await sdk.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    async with aiohttp.ClientSession() as session, session.get(f"{faulty.url}/metrics") as got:
        metrics = await got.text()
    dropped = [line for line in metrics.splitlines() if 'kind="dropped_chunk"' in line]
    assert dropped and dropped[0].endswith(" 2.0"), dropped


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("scenario_name", ["tools_interleaved", "reasoning", "text_then_tool"])
async def test_tool_calls_and_thinking_survive_the_other_form(
    scenario: ScenarioUpstream, start_proxy: ProxyFactory, scenario_name: str, stream: bool
) -> None:
    """An upstream answering in the other form: the stream collected into one answer (its
    tool calls gathered from their fragments), or the whole answer made a stream (each
    call its own index), reach an Anthropic client as if it had answered as asked."""
    scenario.scenario, scenario.other_form = scenario_name, True
    proxy = await start_proxy([scenario_endpoint(scenario)])
    sdk = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="k", max_retries=0)
    asked: Any = {
        "model": "fake-model",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "weather?"}],
        # Asked for: a request without it gets no thinking (the mending stages drop it).
        "thinking": {"type": "enabled", "budget_tokens": 32},
    }
    async with sdk:
        if stream:
            async with sdk.messages.stream(**asked) as events:
                message = await events.get_final_message()
        else:
            message = await sdk.messages.create(**asked)
    calls = {
        i: (block.id, block.name, block.input)
        for i, block in enumerate(b for b in message.content if b.type == "tool_use")
    }
    assert calls == EXPECTED_TOOLS.get(scenario_name, {})
    texts = "".join(b.text for b in message.content if b.type == "text")
    thinking = "".join(b.thinking for b in message.content if b.type == "thinking")
    if scenario_name == "reasoning":
        assert (thinking, texts) == ("Let me think.", "It is 4.")
    assert message.stop_reason == ("end_turn" if scenario_name == "reasoning" else "tool_use")


async def test_legacy_completions_in_the_other_form(
    scenario: ScenarioUpstream, start_proxy: ProxyFactory
) -> None:
    scenario.other_form = True
    proxy = await start_proxy([scenario_endpoint(scenario)])
    sdk = proxy.client()
    whole = await sdk.completions.create(model="fake-model", prompt="Say hi")
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == ("Hello, world!", "stop")
    stream = await sdk.completions.create(model="fake-model", prompt="Say hi", stream=True)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello, world!"
    assert all(chunk.object == "text_completion" for chunk in chunks)


async def test_an_answer_cut_at_its_bound_is_let_go_without_the_cycle_collector(
    aiohttp_server: Any, start_proxy: ProxyFactory
) -> None:
    """The body read so far is freed by reference counting alone when an answer is cut at
    max_response_bytes: a traceback cycle held each one (64 MiB by default) until a
    collection, and a worker grew by that much per answer (`make chaos` measures it)."""
    hostile = HostileUpstream(mode="huge_body", size=4 * MiB)
    server = await aiohttp_server(hostile.app())
    endpoint = {"hostname": "127.0.0.1", "port_start": server.port}
    proxy = await start_proxy([endpoint], max_response_bytes=MiB)
    body = {"model": "hostile", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:

        async def cut() -> None:
            async with session.post(f"{proxy.url}/v1/chat/completions", json=body) as got:
                assert got.status == 502 and b"upstream_too_large" in await got.read()

        await cut()
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                await cut()
            gc.collect()
            held = [len(o) for o in gc.garbage if isinstance(o, bytes) and len(o) > 64 * 1024]
            frames = [o.f_code.co_name for o in gc.garbage if isinstance(o, types.FrameType)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert (held, frames) == ([], [])


GOOD_MESSAGE = {"role": "assistant", "content": "hi", "tool_calls": None}


@pytest.mark.parametrize(
    ("choice", "usage", "problem"),
    [
        ({"message": GOOD_MESSAGE, "finish_reason": "stop"}, {"prompt_tokens": 1}, None),
        ({"message": {**GOOD_MESSAGE, "reasoning_content": ["x"]}}, None, "reasoning_content"),
        ({"message": GOOD_MESSAGE, "finish_reason": 1}, None, "finish_reason"),
        ({"message": GOOD_MESSAGE, "index": True}, None, "index"),
        ({"message": {**GOOD_MESSAGE, "tool_calls": [5]}}, None, "tool_calls[0]"),
        (
            {"message": {**GOOD_MESSAGE, "tool_calls": [{"function": {"name": 5}}]}},
            None,
            "function.name",
        ),
        ({"message": GOOD_MESSAGE}, {"completion_tokens": -1}, "completion_tokens"),
        ({"message": GOOD_MESSAGE}, {"prompt_tokens": True}, "prompt_tokens"),
        ({"message": GOOD_MESSAGE}, {"prompt_tokens_details": {"cached_tokens": "2"}}, "cached"),
        ({"text": "hi"}, None, "message"),  # a completions choice in a chat answer
    ],
)
def test_the_members_llproxy_reads_are_checked(
    choice: dict[str, Any], usage: Any, problem: str | None
) -> None:
    document = {"choices": [{"index": 0, **choice}], "usage": usage}
    found = answer_problem(document, "chat/completions")
    assert found is None if problem is None else problem in (found or "")
    # The same members in a chunk's delta.
    delta = {k: v for k, v in choice.items() if k != "message"}
    if "message" in choice:
        delta["delta"] = {k: v for k, v in choice["message"].items() if k != "role"}
    chunk = {"choices": [{"index": 0, **delta}], "usage": usage}
    if "text" not in choice:
        found = chunk_problem(chunk)
        assert found is None if problem is None else problem in (found or "")


def test_a_streamed_tool_call_fragment_may_lack_its_function() -> None:
    fragment = {"index": 0, "id": "call_1", "type": "function"}
    assert chunk_problem({"choices": [{"delta": {"tool_calls": [fragment]}}]}) is None
    assert (
        answer_problem({"choices": [{"text": 5}]}, "completions")
        == "choices[0].text is not a string"
    )
