"""Answers mended on the way, through every client dialect with its official SDK: tool calls
a local model wrote as text become real tool calls, inline thinking becomes reasoning, a
stream that repeats itself is cut (and the model stopped). The upstream is the scripted
fake, answering llama.cpp-shaped chunks of the text each test gives it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import ollama
import orjson
import pytest
from google import genai
from google.genai import types

from llproxy.core.mend.loops import LoopLimits
from llproxy.core.mend.plan import Plan
from llproxy.core.mend.policy import Mending, MendPolicy, Repair
from llproxy.core.mend.stream import MendedStream
from llproxy.core.record import RequestRecord
from llproxy.core.registry import Replica, Upstream
from llproxy.stores.sqlite import DATABASE

from .conftest import ProxyFactory, RunningProxy, scenario_endpoint
from .scenario_upstream import ScenarioUpstream, Step

# google-genai's async client subclasses aiohttp's ClientSession, which aiohttp discourages.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession:DeprecationWarning"
)

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOL = {"name": "get_weather", "description": "The weather in a city", "schema": SCHEMA}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
DIALECTS = ("openai", "anthropic", "responses", "ollama", "gemini")


@dataclass
class TextUpstream(ScenarioUpstream):
    """Answers each chat with `said`: (member, text) pieces, each a chunk of its own, as
    llama.cpp streams them; `finish` ends it."""

    said: list[tuple[str, str]] = field(default_factory=list)
    finish: str = "stop"

    def steps(self, body: dict[str, Any]) -> list[Step]:
        role: Step = ({"role": "assistant", "content": None}, None)
        return [role, *(({m: t}, None) for m, t in self.said), ({}, self.finish)]

    def say(self, text: str, size: int = 3, member: str = "content") -> None:
        """The text, cut into chunks of `size` characters (tags split across chunks)."""
        self.said = [(member, text[i : i + size]) for i in range(0, len(text), size)]


@dataclass
class Said:
    """An answer as any dialect's client saw it."""

    text: str = ""
    thinking: str = ""
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    stop: str = ""  # "stop", "tool" or "length", whatever the dialect calls them


@pytest.fixture
async def model() -> AsyncIterator[TextUpstream]:
    # Chunks written at once (reads group them at random); tests that want them apart,
    # as a model writes them, set a delay.
    upstream = TextUpstream(model_id="qwen-local")
    await upstream.start()
    yield upstream
    await upstream.close()


@pytest.fixture
async def proxy(start_proxy: ProxyFactory, model: TextUpstream, tmp_path: Path) -> RunningProxy:
    return await start_proxy(
        [scenario_endpoint(model)],
        state_dir=str(tmp_path / "state"),
        repair={"models": {"qwen-open*": {"think_open": True}}},
        aliases={"qwen-open": "qwen-local"},
        loops={"min_span": 40, "repeats": 6},
    )


# --- each dialect's client, its answer as a Said ------------------------------------------


async def ask(
    proxy: RunningProxy,
    dialect: str,
    stream: bool,
    tools: bool = True,
    thinking: bool = True,
    model: str = "qwen-local",
) -> Said:
    return await _CLIENTS[dialect](proxy, stream, tools, thinking, model)


async def _openai(
    proxy: RunningProxy, stream: bool, tools: bool, thinking: bool, model: str
) -> Said:
    client = proxy.client()
    offered: Any = (
        [
            {
                "type": "function",
                "function": {
                    "name": TOOL["name"],
                    "description": TOOL["description"],
                    "parameters": SCHEMA,
                },
            }
        ]
        if tools
        else None
    )
    extra: dict[str, Any] = {"tools": offered} if offered else {}
    said = Said()
    if not stream:
        answer = await client.chat.completions.create(model=model, messages=ASK, **extra)  # type: ignore[arg-type]
        choice = answer.choices[0]
        said.text = choice.message.content or ""
        said.thinking = getattr(choice.message, "reasoning_content", None) or ""
        for call in choice.message.tool_calls or ():
            said.calls.append((call.function.name, json.loads(call.function.arguments)))  # type: ignore[union-attr]
        said.stop = _stop(choice.finish_reason)
        return said
    calls: dict[int, list[str]] = {}
    async for chunk in await client.chat.completions.create(
        model=model,
        messages=ASK,  # type: ignore[arg-type]
        stream=True,
        **extra,
    ):
        for choice in chunk.choices:
            said.text += choice.delta.content or ""
            said.thinking += getattr(choice.delta, "reasoning_content", None) or ""
            for fragment in choice.delta.tool_calls or ():
                entry = calls.setdefault(fragment.index, ["", ""])
                if fragment.function is not None:
                    entry[0] += fragment.function.name or ""
                    entry[1] += fragment.function.arguments or ""
            if choice.finish_reason:
                said.stop = _stop(choice.finish_reason)
    said.calls = [(name, json.loads(args)) for _, (name, args) in sorted(calls.items())]
    return said


def _stop(reason: str | None) -> str:
    return {
        "tool_calls": "tool",
        "tool_use": "tool",
        "length": "length",
        "max_tokens": "length",
    }.get(reason or "", "stop")


async def _anthropic(
    proxy: RunningProxy, stream: bool, tools: bool, thinking: bool, model: str
) -> Said:
    extra: dict[str, Any] = {}
    if tools:
        extra["tools"] = [
            {"name": TOOL["name"], "description": TOOL["description"], "input_schema": SCHEMA}
        ]
    if thinking:
        extra["thinking"] = {"type": "enabled", "budget_tokens": 1024}
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0) as client:
        if stream:
            async with client.messages.stream(
                model=model,
                max_tokens=2000,
                messages=ASK,  # type: ignore[arg-type]
                **extra,
            ) as events:
                message = await events.get_final_message()
        else:
            message = await client.messages.create(
                model=model,
                max_tokens=2000,
                messages=ASK,  # type: ignore[arg-type]
                **extra,
            )
    said = Said(stop=_stop(message.stop_reason))
    for block in message.content:
        if block.type == "text":
            said.text += block.text
        elif block.type == "thinking":
            said.thinking += block.thinking
        elif block.type == "tool_use":
            said.calls.append((block.name, dict(block.input)))  # type: ignore[call-overload]
    return said


async def _responses(
    proxy: RunningProxy, stream: bool, tools: bool, thinking: bool, model: str
) -> Said:
    client = proxy.client()
    extra: dict[str, Any] = {}
    if tools:
        extra["tools"] = [
            {
                "type": "function",
                "name": TOOL["name"],
                "description": TOOL["description"],
                "parameters": SCHEMA,
                "strict": False,
            }
        ]
    if stream:
        response = None
        async for event in await client.responses.create(
            model=model, input="Weather in Paris?", stream=True, **extra
        ):
            if event.type in ("response.completed", "response.incomplete"):
                response = event.response
        assert response is not None
    else:
        response = await client.responses.create(model=model, input="Weather in Paris?", **extra)
    said = Said(stop="length" if response.status == "incomplete" else "stop")
    for item in response.output:
        if item.type == "message":
            said.text += "".join(part.text for part in item.content if part.type == "output_text")
        elif item.type == "reasoning":
            said.thinking += "".join(part.text for part in item.content or ())
        elif item.type == "function_call":
            said.calls.append((item.name, json.loads(item.arguments)))
            said.stop = "tool"
    return said


async def _ollama(
    proxy: RunningProxy, stream: bool, tools: bool, thinking: bool, model: str
) -> Said:
    client = ollama.AsyncClient(host=proxy.url)
    offered = (
        [
            {
                "type": "function",
                "function": {
                    "name": TOOL["name"],
                    "description": TOOL["description"],
                    "parameters": SCHEMA,
                },
            }
        ]
        if tools
        else None
    )
    said = Said()
    try:
        if stream:
            parts = [
                part
                async for part in await client.chat(
                    model, ASK, tools=offered, stream=True, think=thinking
                )
            ]
        else:
            parts = [await client.chat(model, ASK, tools=offered, think=thinking)]
    finally:
        await client.close()
    for part in parts:
        said.text += part.message.content or ""
        said.thinking += part.message.thinking or ""
        for call in part.message.tool_calls or ():
            said.calls.append((call.function.name, dict(call.function.arguments)))
        if part.done:
            said.stop = "length" if part.done_reason == "length" else "stop"
    if said.calls:
        said.stop = "tool"
    return said


async def _gemini(
    proxy: RunningProxy, stream: bool, tools: bool, thinking: bool, model: str
) -> Said:
    client = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=proxy.url))
    config = types.GenerateContentConfig(
        tools=[
            types.Tool(
                function_declarations=[
                    types.FunctionDeclaration(
                        name=TOOL["name"],
                        description=TOOL["description"],
                        parameters_json_schema=SCHEMA,
                    )
                ]
            )
        ]
        if tools
        else None,
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        # As google-genai sends it: without includeThoughts no thought parts come back.
        thinking_config=types.ThinkingConfig(include_thoughts=True) if thinking else None,
    )
    try:
        if stream:
            frames = [
                frame
                async for frame in await client.aio.models.generate_content_stream(
                    model=model, contents="Weather in Paris?", config=config
                )
            ]
        else:
            frames = [
                await client.aio.models.generate_content(
                    model=model, contents="Weather in Paris?", config=config
                )
            ]
    finally:
        await client.aio.aclose()
    said = Said()
    for frame in frames:
        candidate = (frame.candidates or [None])[0]
        if candidate is None:
            continue
        for part in (candidate.content.parts if candidate.content else None) or ():
            if part.function_call is not None:
                call = part.function_call
                said.calls.append((call.name or "", dict(call.args or {})))
            elif part.thought:
                said.thinking += part.text or ""
            else:
                said.text += part.text or ""
        if candidate.finish_reason is not None:
            length = candidate.finish_reason == types.FinishReason.MAX_TOKENS
            said.stop = "length" if length else "stop"
    if said.calls:
        said.stop = "tool"
    return said


_CLIENTS = {
    "openai": _openai,
    "anthropic": _anthropic,
    "responses": _responses,
    "ollama": _ollama,
    "gemini": _gemini,
}


async def metrics(proxy: RunningProxy) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/metrics") as resp:
        return await resp.text()


# --- tool calls -----------------------------------------------------------------------------

FORMS = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "function": '<function=get_weather>{"city": "Paris"}</function>',
    "qwen3-coder": (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "</function>\n</tool_call>"
    ),
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    "mistral-v11": '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
    "fenced": (
        'I will look it up.\n```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'
    ),
}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("form", sorted(FORMS))
async def test_each_text_form_becomes_a_tool_call(
    proxy: RunningProxy, model: TextUpstream, form: str, stream: bool
) -> None:
    model.say(FORMS[form])
    said = await ask(proxy, "openai", stream)
    assert said.calls == [("get_weather", {"city": "Paris"})]
    assert said.stop == "tool"
    assert "get_weather" not in said.text and "<" not in said.text
    assert said.text == ("I will look it up.\n" if form == "fenced" else "")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("dialect", DIALECTS)
async def test_every_dialect_gets_the_repaired_call(
    proxy: RunningProxy, model: TextUpstream, dialect: str, stream: bool
) -> None:
    for form, text in FORMS.items():
        model.say("Checking.\n" + text)
        said = await ask(proxy, dialect, stream)
        assert said.calls == [("get_weather", {"city": "Paris"})], form
        assert said.text.strip() in ("Checking.", "Checking.\nI will look it up."), form
        assert said.stop == "tool", form


DEFECTS = {
    "trailing comma": '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2,},}',
    "single quotes": "{'name': 'get_weather', 'arguments': {'city': 'Paris', 'days': 2}}",
    "cut-off brace": '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2',
    "arguments as a string": (
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"days\\": 2}"}'
    ),
}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("defect", sorted(DEFECTS))
async def test_arguments_with_the_usual_defects_are_repaired(
    proxy: RunningProxy, model: TextUpstream, defect: str, stream: bool
) -> None:
    closing = "" if defect == "cut-off brace" else "</tool_call>"
    model.say(f"<tool_call>{DEFECTS[defect]}{closing}")
    said = await ask(proxy, "openai", stream)
    assert said.calls == [("get_weather", {"city": "Paris", "days": 2})]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_what_cannot_be_made_valid_stays_text_and_is_counted(
    proxy: RunningProxy, model: TextUpstream, stream: bool
) -> None:
    # Not the schema's: `town` is no property (additionalProperties false), city missing.
    bad = '<tool_call>{"name": "get_weather", "arguments": {"town": "Paris"}}</tool_call>'
    model.say(bad)
    said = await ask(proxy, "openai", stream)
    assert said.calls == [] and said.text == bad and said.stop == "stop"
    assert 'llproxy_tool_calls_unrepaired_total{model="qwen-local"} 1.0' in await metrics(proxy)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_a_tool_not_offered_is_never_called(
    proxy: RunningProxy, model: TextUpstream, stream: bool
) -> None:
    other = '<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call>'
    model.say(other)
    said = await ask(proxy, "openai", stream)
    assert said.calls == [] and said.text == other
    # No tools offered at all: the offered tool's form is left as text too.
    model.say(FORMS["hermes"])
    said = await ask(proxy, "openai", stream, tools=False)
    assert said.calls == [] and said.text == FORMS["hermes"]


async def test_text_that_only_looks_like_a_call_streams_unchanged(
    proxy: RunningProxy, model: TextUpstream
) -> None:
    text = "Use a < b, list[0], `code`, and:\n```python\nprint('<tool')\n```\nDone [1]."
    model.say(text, size=2)
    said = await ask(proxy, "openai", True)
    assert said.text == text and said.calls == [] and said.stop == "stop"


# --- thinking -----------------------------------------------------------------------------

THOUGHT = "<think>\nThe user wants weather.\n</think>\n\nIt is sunny."


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("dialect", DIALECTS)
async def test_inline_thinking_reaches_every_dialect_as_reasoning(
    proxy: RunningProxy, model: TextUpstream, dialect: str, stream: bool
) -> None:
    model.say(THOUGHT, size=2)  # every tag split across chunks
    model.chunk_delay = 0.002  # and across reads
    said = await ask(proxy, dialect, stream, tools=False)
    assert said.thinking == "The user wants weather.\n"
    assert said.text == "It is sunny."


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_thinking_then_a_tool_call(
    proxy: RunningProxy, model: TextUpstream, stream: bool
) -> None:
    model.say("<think>Need the tool.</think>\n" + FORMS["hermes"], size=4)
    said = await ask(proxy, "anthropic", stream)
    assert said.thinking == "Need the tool."
    assert said.calls == [("get_weather", {"city": "Paris"})] and said.text == ""


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_an_answer_with_only_the_closing_tag(
    proxy: RunningProxy, model: TextUpstream, stream: bool
) -> None:
    """The template opened the block in the prompt: a model configured so (`think_open`)
    has its answer start inside it; a whole answer shows it by its lone closing tag."""
    model.say("The user wants weather.</think>\nIt is sunny.")
    said = await ask(proxy, "openai", stream, tools=False, model="qwen-open")
    assert (said.thinking, said.text) == ("The user wants weather.", "It is sunny.")
    if not stream:  # without the switch: told by the lone closing tag
        said = await ask(proxy, "openai", stream, tools=False)
        assert (said.thinking, said.text) == ("The user wants weather.", "It is sunny.")


# The generation prompt's end of DeepSeek-R1's template, and of Qwen3's (hybrid) one that
# opens and closes the block only when thinking is off.
OPENING = "{% if add_generation_prompt %}{{'<\uff5cAssistant\uff5c><think>\\n'}}{% endif %}"
HYBRID = (
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


async def test_a_template_that_opens_the_block_is_seen_at_discovery(
    proxy: RunningProxy, model: TextUpstream
) -> None:
    """llama.cpp's /props shows the template: a stream of its model starts inside the
    block with no `think_open` configured."""
    model.say("The user wants weather.</think>\nIt is sunny.")
    model.chat_template, model.n_ctx_train = OPENING, 32768  # llama.cpp: /props is read
    await proxy.rescan()
    said = await ask(proxy, "openai", True, tools=False)
    assert (said.thinking, said.text) == ("The user wants weather.", "It is sunny.")
    model.chat_template = HYBRID  # opened only to be closed: no answer starts inside
    await proxy.rescan()
    model.say("Sunny.")
    said = await ask(proxy, "openai", True, tools=False)
    assert (said.thinking, said.text) == ("", "Sunny.")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("dialect", ["anthropic", "ollama", "gemini"])
async def test_a_client_that_asked_for_no_thinking_gets_none(
    proxy: RunningProxy, model: TextUpstream, dialect: str, stream: bool
) -> None:
    model.say(THOUGHT)
    said = await ask(proxy, dialect, stream, tools=False, thinking=False)
    assert (said.thinking, said.text) == ("", "It is sunny.")
    # The model's own reasoning member too.
    model.said = [("reasoning_content", "Hmm."), ("content", "Fine.")]
    said = await ask(proxy, dialect, stream, tools=False, thinking=False)
    assert (said.thinking, said.text) == ("", "Fine.")


# --- loops ----------------------------------------------------------------------------------

LOOP = "I will now check the weather in Paris for you. "  # 48 characters


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_looping_stream_is_cut_and_the_model_stopped(
    proxy: RunningProxy,
    model: TextUpstream,
    dialect: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llproxy.access")
    model.say("Sure. " + LOOP * 400, size=4)
    model.chunk_delay = 0.002  # as a model writes: cut long before the fake's end
    said = await asyncio.wait_for(ask(proxy, dialect, True, tools=False), 20)
    assert said.stop == "length"
    assert "cut" in said.text and "repeating" in said.text
    assert len(said.text) < len(LOOP) * 20  # cut within a few repeats of the limit
    await asyncio.wait_for(model.disconnected.wait(), 10)  # the upstream was cancelled
    assert model.disconnect_paths == ["/v1/chat/completions"]
    assert 'llproxy_loops_cut_total{model="qwen-local"} 1.0' in await metrics(proxy)
    (line,) = [r for r in caplog.records if r.name == "llproxy.access"]
    assert line.__dict__["cut"] == "loop"
    if dialect != "openai":
        return  # the usage record is the same for every dialect: read once
    rows: list[Any] = []
    for _ in range(50):  # usage is written in batches each second
        with (
            contextlib.suppress(sqlite3.OperationalError),  # not made yet
            contextlib.closing(sqlite3.connect(tmp_path / "state" / DATABASE)) as db,
        ):
            rows = db.execute("SELECT cut FROM usage").fetchall()
        if rows:
            break
        await asyncio.sleep(0.1)
    assert rows == [("loop",)]


TABLE = "| city | day | temp |\n|---|---|---|\n" + "".join(
    f"| Paris | {day} | {10 + day % 7} C |\n" for day in range(120)
)
CODE = "".join(f"    if value == {n}:\n        return handle(value)\n    }}\n" for n in range(120))


@pytest.mark.parametrize("text", [TABLE, CODE], ids=["table", "code"])
async def test_a_long_answer_with_repeated_phrases_is_not_cut(
    proxy: RunningProxy, model: TextUpstream, text: str
) -> None:
    model.say(text, size=5)
    said = await ask(proxy, "openai", True, tools=False)
    assert said.text == text and said.stop == "stop"
    assert not model.disconnected.is_set()


# --- the switches -------------------------------------------------------------------------


async def test_switched_off_for_an_endpoint_nothing_is_touched(
    start_proxy: ProxyFactory, model: TextUpstream
) -> None:
    off = {"tool_calls": False, "thinking": False, "loops": False}
    proxy = await start_proxy([scenario_endpoint(model, repair=off)])
    model.say("<think>x</think>" + FORMS["hermes"])
    said = await ask(proxy, "openai", True)
    assert said.text == "<think>x</think>" + FORMS["hermes"] and said.calls == []


def _replica(dialect: str = "openai", backend: str = "openai_http") -> Replica:
    upstream = Upstream("http://127.0.0.1:8080/v1", "127.0.0.1", 8080, dialect=dialect)
    return Replica(upstream, "m", backend)


def test_the_switches_by_level() -> None:
    policy = MendPolicy(Mending())
    local = policy.switches(_replica(), "m", {})
    assert (local.tool_calls, local.thinking, local.loops) == (True, True, True)
    for cloud in (_replica("anthropic", "anthropic"), _replica("gemini", "gemini")):
        switches = policy.switches(cloud, "m", {})
        assert (switches.tool_calls, switches.thinking, switches.loops) == (False, False, False)
    assert not policy.switches(_replica(backend="operator"), "m", {}).tool_calls
    # The conversation's own `!/set(…)` wins over every level.
    chosen = policy.switches(_replica(), "m", {"tool-repair": "false", "loop-detection": "off"})
    assert (chosen.tool_calls, chosen.thinking, chosen.loops) == (False, True, False)
    on = policy.switches(_replica("anthropic", "anthropic"), "m", {"thinking": "true"})
    assert on.thinking and not on.tool_calls
    # A model's glob over the top level.
    globbed = MendPolicy(
        Mending(default=Repair(thinking=False), models=(("q*", Repair(think_open=True)),))
    )
    switches = globbed.switches(_replica(), "qwen", {})
    assert (switches.thinking, switches.think_open) == (False, True)


# --- the stream stage on its own: any grouping of events into reads --------------------------


class _Source:
    """A model's stream already read: `ended` once its last read was taken."""

    def __init__(self) -> None:
        self.ended = False
        self.closed = False

    async def next(self) -> bytes:
        return b""

    def close(self) -> None:
        self.closed = True


def _chunks(text: str, size: int) -> list[bytes]:
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return [
        b"data: "
        + orjson.dumps(
            {**head, "choices": [{"index": 0, "delta": {"content": text[i : i + size]}}]}
        )
        + b"\n\n"
        for i in range(0, len(text), size)
    ]


def _through(events: list[bytes], seed: int, plan: Plan) -> tuple[bytes, RequestRecord, _Source]:
    """The events read in random groups through the stage: what the client gets."""
    rng = random.Random(seed)
    record, source = RequestRecord(), _Source()
    stream = MendedStream(source, plan, record)
    out, at = [], 0
    while at < len(events) and not stream.ended:
        take = rng.randint(1, 8)
        source.ended = at + take >= len(events)
        out.append(stream._read(b"".join(events[at : at + take])))
        at += take
    return b"".join(out), record, source


@pytest.mark.parametrize("seed", range(8))
def test_any_grouping_of_reads_gives_the_same_answer(seed: int) -> None:
    plan = Plan({"get_weather": SCHEMA}, True, False, True, LoopLimits(40, 6))
    events = [*_chunks(CODE + TABLE, 5), b"data: [DONE]\n\n"]
    out, record, source = _through(events, seed, plan)
    assert out == b"".join(events) and record.cut is None and not source.closed
    looping = _chunks("Sure. " + LOOP * 100, 4)
    out, record, source = _through(looping, seed, plan)
    assert record.cut == "loop" and source.closed and len(out) < len(b"".join(looping)) / 3
    assert out.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"length"' in out


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_the_conversation_switches_a_stage_off(
    proxy: RunningProxy, model: TextUpstream, stream: bool
) -> None:
    """`!/set(…)` in the conversation's own history wins over the config (Call.settings)."""
    client = proxy.client()
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}

    async def answer(command: str) -> tuple[str, int]:
        history = [
            {"role": "user", "content": command},
            {"role": "assistant", "content": "Noted."},
            *ASK,
        ]
        if not stream:
            done = await client.chat.completions.create(
                model="qwen-local",
                messages=history,  # type: ignore[arg-type]
                tools=[tool],  # type: ignore[list-item]
            )
            return done.choices[0].message.content or "", len(
                done.choices[0].message.tool_calls or ()
            )
        text, calls = "", 0
        async for chunk in await client.chat.completions.create(
            model="qwen-local",
            messages=history,  # type: ignore[arg-type]
            tools=[tool],  # type: ignore[list-item]
            stream=True,
        ):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                calls += len(choice.delta.tool_calls or ())
        return text, calls

    model.say("<think>Hm.</think>" + FORMS["hermes"])
    assert await answer("!/set(tool-repair=false)") == (FORMS["hermes"], 0)
    assert await answer("!/set(thinking=false)") == ("<think>Hm.</think>", 1)
    assert await answer("!/set(loop-detection=false)") == ("", 1)


@pytest.mark.parametrize(
    "form",
    ["almost-json", "many-to-repair", "parameters"],
)
async def test_hostile_call_text_is_left_as_text_at_once(
    proxy: RunningProxy, model: TextUpstream, form: str
) -> None:
    """Text a client can have a model echo, in one read: json-repair took half a minute
    over 30 kB of `{a:b,` (quadratic), 300 small repairs added up, and `<parameter=` openings
    with no end were searched to the end from each. They stay text, answered at once."""
    # Arguments as a JSON string (valid JSON around them): what the string holds is
    # repaired on its own.
    opening = '<tool_call>{"name": "get_weather", "arguments": "'
    if form == "almost-json":
        text = opening + "{a:b," * 6_000 + '"}</tool_call>'
    elif form == "many-to-repair":
        text = (opening + "{a:b," * 350 + '"}</tool_call>') * 300
    else:
        text = "<function=get_weather>" + "<parameter=x>" * 46_000 + "</function>"
    model.say(text, size=len(text))
    loop = asyncio.get_running_loop()
    started = loop.time()
    said = await ask(proxy, "openai", False)
    assert said.calls == [] and said.text == text
    assert loop.time() - started < 20  # did not hang: unbounded, each took over a minute


def test_a_stream_of_white_space_before_any_text_is_not_held_whole() -> None:
    """White space at an answer's start is held while a `<think>` may still open; a model
    that writes nothing but line ends had them all held and joined again on every read
    (quadratic). Past a short lead the block can no longer open: the text goes on."""
    plan = Plan({}, True, False, True, None)
    record, source = RequestRecord(), _Source()
    stream = MendedStream(source, plan, record)
    events = _chunks("\n\n\n\n" * 150_000, 4)
    started = time.monotonic()
    out = []
    for event in events:
        out.append(stream._read(event))
    source.ended = True
    out.append(stream._read(b"data: [DONE]\n\n"))
    assert time.monotonic() - started < 10  # did not hang: held whole, 15 s here
    assert b"".join(out).count(b"\\n") == 600_000
