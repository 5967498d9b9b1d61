"""Commands in the chat (`!/help`, `!/models`, `!/model(NAME)`, `!/set(…)`, `!/usage`)
through every client dialect's official SDK, streamed and not: llproxy answers them
itself (the upstreams' request logs stay empty), a conversation's settings and model come
from the commands in its own history, which the model never sees, and a key limited to
one model cannot switch to another."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import ollama
import openai
import pytest
from google import genai
from google.genai import types

from llproxy.config import ConfigError, parse_config
from llproxy.core.commands import MARK
from llproxy.stores.sqlite import KeyStore

from .conftest import (
    ProxyFactory,
    RunningProxy,
    UpstreamFactory,
    recorded,
    scenario_endpoint,
    write_config,
)
from .scenario_upstream import ScenarioUpstream

pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession:DeprecationWarning"
)

History = list[tuple[str, str]]  # (role, text): "user" or "assistant"
Ask = Callable[[History, bool, str], Awaitable[str]]


@pytest.fixture
async def other() -> AsyncIterator[ScenarioUpstream]:
    """A second local server, of another model: where `!/model(other-model)` leads."""
    upstream = ScenarioUpstream(model_id="other-model")
    await upstream.start()
    yield upstream
    await upstream.close()


@pytest.fixture
async def proxy(
    start_proxy: ProxyFactory, scenario: ScenarioUpstream, other: ScenarioUpstream, tmp_path: Path
) -> RunningProxy:
    running = await start_proxy(
        [scenario_endpoint(scenario), scenario_endpoint(other)], state_dir=str(tmp_path / "st")
    )
    await running.rescan()
    return running


def upstream_calls(*upstreams: ScenarioUpstream) -> int:
    return sum(len(u.bodies()) for u in upstreams)


# --- each dialect's client: a history in, the answer's text out ----------------------------


def openai_chat(proxy: RunningProxy, key: str = "none") -> Ask:
    sdk = proxy.client(key)

    async def ask(history: History, stream: bool, model: str) -> str:
        messages: Any = [{"role": role, "content": text} for role, text in history]
        if not stream:
            done = await sdk.chat.completions.create(model=model, messages=messages)
            return done.choices[0].message.content or ""
        parts = await sdk.chat.completions.create(model=model, messages=messages, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in parts if c.choices])

    return ask


def responses(proxy: RunningProxy) -> Ask:
    sdk = proxy.client()

    async def ask(history: History, stream: bool, model: str) -> str:
        items: Any = [{"role": role, "content": text} for role, text in history]
        if not stream:
            return (await sdk.responses.create(model=model, input=items)).output_text
        async with sdk.responses.stream(model=model, input=items) as events:
            deltas = [e.delta async for e in events if e.type == "response.output_text.delta"]
            final = await events.get_final_response()
        assert "".join(deltas) == final.output_text
        return final.output_text

    return ask


def claude(proxy: RunningProxy, opened: list[Any]) -> Ask:
    sdk = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="none", max_retries=0)
    opened.append(sdk)

    async def ask(history: History, stream: bool, model: str) -> str:
        messages: Any = [{"role": role, "content": text} for role, text in history]
        if not stream:
            made = await sdk.messages.create(model=model, max_tokens=100, messages=messages)
            return "".join(b.text for b in made.content if b.type == "text")
        async with sdk.messages.stream(model=model, max_tokens=100, messages=messages) as s:
            final = await s.get_final_message()
        return "".join(b.text for b in final.content if b.type == "text")

    return ask


def ollama_chat(proxy: RunningProxy, opened: list[Any]) -> Ask:
    sdk = ollama.AsyncClient(host=proxy.url, timeout=30)
    opened.append(sdk)

    async def ask(history: History, stream: bool, model: str) -> str:
        messages = [{"role": role, "content": text} for role, text in history]
        if not stream:
            return (await sdk.chat(model=model, messages=messages)).message.content or ""
        parts = await sdk.chat(model=model, messages=messages, stream=True)
        return "".join([part.message.content or "" async for part in parts])

    return ask


def gemini(proxy: RunningProxy, opened: list[Any]) -> Ask:
    client = genai.Client(api_key="none", http_options=types.HttpOptions(base_url=proxy.url))
    opened.append(client.aio)

    async def ask(history: History, stream: bool, model: str) -> str:
        contents: Any = [
            types.Content(
                role="model" if role == "assistant" else "user", parts=[types.Part(text=text)]
            )
            for role, text in history
        ]
        if not stream:
            return (await client.aio.models.generate_content(model=model, contents=contents)).text
        parts = await client.aio.models.generate_content_stream(model=model, contents=contents)
        return "".join([chunk.text or "" async for chunk in parts])

    return ask


DIALECTS = ("openai", "responses", "anthropic", "ollama", "gemini")


@pytest.fixture
async def clients(proxy: RunningProxy) -> AsyncIterator[dict[str, Ask]]:
    opened: list[Any] = []
    yield {
        "openai": openai_chat(proxy),
        "responses": responses(proxy),
        "anthropic": claude(proxy, opened),
        "ollama": ollama_chat(proxy, opened),
        "gemini": gemini(proxy, opened),
    }
    for sdk in opened:
        await (sdk.aclose() if hasattr(sdk, "aclose") else sdk.close())


# --- every command, every dialect -----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("dialect", DIALECTS)
async def test_every_command_is_answered_by_llproxy_in_the_clients_dialect(
    clients: dict[str, Ask],
    scenario: ScenarioUpstream,
    other: ScenarioUpstream,
    dialect: str,
    stream: bool,
) -> None:
    ask = clients[dialect]
    history: History = []

    async def say(text: str) -> str:
        history.append(("user", text))
        answer = await ask(history, stream, "fake-model")
        history.append(("assistant", answer))
        assert answer.startswith(MARK)
        return answer

    helped = await say("!/help")
    for command in ("!/models", "!/model(NAME)", "!/set(", "!/usage", "loop-detection"):
        assert command in helped
    listed = await say("!/models")
    assert "- fake-model  ← this conversation" in listed and "- other-model" in listed
    assert "goes to other-model from now on" in await say("!/model(other-model)")
    assert "- other-model  ← this conversation" in await say("!/models")
    assert "goes to other-model (set with" in await say("!/model")
    assert "loop-detection = false" in await say("!/set(loop-detection=false)")
    shown = await say("!/set")
    assert "- loop-detection: false" in shown and "- thinking: default" in shown
    assert "No requests today" in await say("!/usage")
    assert upstream_calls(scenario, other) == 0  # nothing went upstream
    # The next real turn goes to the model the history chose, without llproxy's part.
    history.append(("user", "hi"))
    assert await ask(history, stream, "fake-model") == "Hello, world!"
    assert len(scenario.bodies()) == 0 and len(other.bodies()) == 1
    sent = other.bodies()[0]
    assert sent["model"] == "other-model"
    texts = [str(m.get("content")) for m in sent["messages"]]
    assert not any("!/" in t or MARK in t for t in texts)
    assert any("hi" in t for t in texts)


async def test_mistakes_get_a_helpful_answer(
    clients: dict[str, Ask], scenario: ScenarioUpstream, other: ScenarioUpstream
) -> None:
    ask = clients["openai"]
    unknown = await ask([("user", "!/frobnicate")], False, "fake-model")
    assert "Unknown command `!/frobnicate`" in unknown and "!/models" in unknown
    bad = await ask([("user", "!/set(colour=blue, thinking=maybe)")], False, "fake-model")
    assert "unknown setting 'colour'" in bad
    assert "known: tool-repair, thinking, loop-detection, tool-loops" in bad
    assert "thinking takes true or false, not 'maybe'" in bad
    nowhere = await ask([("user", "!/model(no-such-model)")], True, "fake-model")
    assert "Not switched" in nowhere and "fake-model, other-model" in nowhere
    # Two commands in one message, each answered.
    both = await ask([("user", "!/set(thinking=off) !/model")], False, "fake-model")
    assert "thinking = false" in both and "goes to the model it asks for (fake-model)" in both
    assert upstream_calls(scenario, other) == 0


async def test_a_command_needs_no_model_name(proxy: RunningProxy) -> None:
    """A raw body that names no model (and no default is set) is a 400 for a model, but a
    command is llproxy's to answer all the same."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "!/help"}]},
        ) as resp,
    ):
        assert resp.status == 200
        answer = await resp.json()
    assert answer["choices"][0]["message"]["content"].startswith(MARK)


async def test_settings_and_model_come_from_the_history(
    clients: dict[str, Ask], scenario: ScenarioUpstream, other: ScenarioUpstream
) -> None:
    """A `!/model` earlier in the history routes this turn (the last one that took wins),
    and the model sees neither the commands nor llproxy's answers."""
    ask = clients["anthropic"]
    history: History = [
        ("user", "!/model(other-model)"),
        ("assistant", f"{MARK}\n\nThis conversation goes to other-model from now on."),
        ("user", "What is 2+2?"),
        ("assistant", "4"),
        ("user", "!/model(fake-model)\n"),
        ("assistant", f"{MARK}\n\nThis conversation goes to fake-model from now on."),
        ("user", "!/model(missing)"),
        ("assistant", f"{MARK}\n\nNot switched."),
        ("user", "And 3+3?"),
    ]
    assert await ask(history, True, "other-model") == "Hello, world!"
    assert len(other.bodies()) == 0
    (sent,) = scenario.bodies()
    assert [(m["role"], m["content"]) for m in sent["messages"]] == [
        ("user", "What is 2+2?"),
        ("assistant", "4"),
        ("user", "And 3+3?"),
    ]


async def test_a_command_after_an_agents_own_reminder(
    proxy: RunningProxy, scenario: ScenarioUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Claude Code puts reminders of its own before what the user typed, in one message:
    the command is still found, and the access log says llproxy answered it."""
    caplog.set_level(logging.INFO, logger="llproxy.access")
    sdk = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="none", max_retries=0)
    reminder = {"type": "text", "text": "<system-reminder>Be careful.</system-reminder>"}
    typed = {"type": "text", "text": "!/model"}
    made = await sdk.messages.create(
        model="fake-model",
        max_tokens=100,
        messages=[{"role": "user", "content": [reminder, typed, reminder]}],
    )
    await sdk.close()
    assert made.content[0].text.startswith(MARK)  # type: ignore[union-attr]
    assert "goes to the model it asks for (fake-model)" in made.content[0].text  # type: ignore[union-attr]
    assert scenario.bodies() == []
    # Text the user typed before a command is the model's: no command.
    said = await openai_chat(proxy)([("user", "Look: !/model")], False, "fake-model")
    assert said == "Hello, world!"
    lines = [r for r in caplog.records if getattr(r, "event", None) == "request"]
    assert [(r.path, r.stage) for r in lines] == [  # type: ignore[attr-defined]
        ("/v1/messages", "command"),
        ("/v1/chat/completions", None),
    ]


async def test_usage_today_is_this_clients(
    clients: dict[str, Ask], proxy: RunningProxy, tmp_path: Path
) -> None:
    ask = clients["ollama"]
    assert await ask([("user", "hi")], False, "fake-model") == "Hello, world!"
    await recorded(tmp_path / "st", "key", 1)
    usage = await ask([("user", "!/usage")], True, "fake-model")
    assert "This key today: 1 requests, 11 prompt tokens, 7 completion tokens." in usage
    assert "- fake-model: 1 requests" in usage


async def test_metrics_count_the_commands_answered(
    clients: dict[str, Ask], proxy: RunningProxy
) -> None:
    await clients["openai"]([("user", "!/help")], False, "fake-model")
    body = await proxy.state.metrics()
    assert b'llproxy_request_stages_total{stage="command"} 1.0' in body


# --- keys -------------------------------------------------------------------------------------


@pytest.fixture
async def keyed(
    start_proxy: ProxyFactory, scenario: ScenarioUpstream, other: ScenarioUpstream, tmp_path: Path
) -> tuple[RunningProxy, dict[str, str]]:
    state = tmp_path / "keyed"
    state.mkdir()
    with KeyStore(state) as store:
        keys = {
            "solo": store.create("solo", ["fake-model"]),
            "full": store.create("full"),
            "quiet": store.create("quiet"),
        }
    running = await start_proxy(
        [scenario_endpoint(scenario), scenario_endpoint(other)],
        state_dir=str(state),
        commands={"disabled_keys": ["qui*"]},
    )
    await running.rescan()
    return running, keys


async def test_a_key_limited_to_one_model_cannot_switch(
    keyed: tuple[RunningProxy, dict[str, str]],
    scenario: ScenarioUpstream,
    other: ScenarioUpstream,
) -> None:
    proxy, keys = keyed
    solo = openai_chat(proxy, keys["solo"])
    listed = await solo([("user", "!/models")], False, "fake-model")
    assert "- fake-model" in listed and "other-model" not in listed
    refused = await solo([("user", "!/model(other-model)")], True, "fake-model")
    assert "Not switched: this API key may not use the model 'other-model'" in refused
    history: History = [("user", "!/model(other-model)"), ("assistant", refused), ("user", "hi")]
    assert await solo(history, False, "fake-model") == "Hello, world!"
    assert (len(scenario.bodies()), len(other.bodies())) == (1, 0)
    # A key that may use both switches.
    full = openai_chat(proxy, keys["full"])
    assert "other-model from now on" in await full([("user", "!/model(other-model)")], False, "x")
    history[1] = ("assistant", "[llproxy]\n\nThis conversation goes to other-model from now on.")
    assert await full(history, False, "fake-model") == "Hello, world!"
    assert (len(scenario.bodies()), len(other.bodies())) == (1, 1)


async def test_commands_off_for_a_key_go_to_the_model(
    keyed: tuple[RunningProxy, dict[str, str]], scenario: ScenarioUpstream
) -> None:
    proxy, keys = keyed
    quiet = openai_chat(proxy, keys["quiet"])
    assert await quiet([("user", "!/help")], False, "fake-model") == "Hello, world!"
    assert scenario.bodies()[0]["messages"] == [{"role": "user", "content": "!/help"}]


async def test_commands_off_everywhere_and_another_prefix(
    start_proxy: ProxyFactory, scenario: ScenarioUpstream, tmp_path: Path
) -> None:
    off = await start_proxy([scenario_endpoint(scenario)], commands={"enable": False})
    await off.rescan()
    assert await openai_chat(off)([("user", "!/help")], False, "fake-model") == "Hello, world!"
    other = await start_proxy(
        [scenario_endpoint(scenario)], commands={"prefix": "@llp/"}, state_dir=str(tmp_path / "x")
    )
    await other.rescan()
    ask = openai_chat(other)
    assert (await ask([("user", "@llp/help")], False, "fake-model")).startswith(MARK)
    assert await ask([("user", "!/help")], False, "fake-model") == "Hello, world!"
    assert len(scenario.bodies()) == 2


async def test_token_counts_count_what_the_model_sees(
    proxy: RunningProxy, scenario: ScenarioUpstream
) -> None:
    """Commands and llproxy's answers never reach the model: a count leaves them out,
    as counted by the model's server (llama.cpp's template) and as an estimate."""
    history: Any = [
        {"role": "user", "content": "!/set temperature=0.2"},
        {"role": "assistant", "content": f"{MARK} set temperature=0.2 " + "x" * 400},
        {"role": "user", "content": "hello"},
    ]
    sdk = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="none", max_retries=0)
    client = genai.Client(api_key="none", http_options=types.HttpOptions(base_url=proxy.url))
    try:
        await sdk.messages.count_tokens(model="fake-model", messages=history)
        await client.aio.models.count_tokens(
            model="fake-model",
            contents=[
                types.Content(
                    role="model" if m["role"] == "assistant" else "user",
                    parts=[types.Part(text=m["content"])],
                )
                for m in history
            ],
        )
        sent = [body["messages"] for body in scenario.bodies("/apply-template")]
        assert sent == [[{"role": "user", "content": "hello"}]] * 2
        scenario.template_enabled = False  # no count by the server: the estimate's text
        estimated = await sdk.messages.count_tokens(model="fake-model", messages=history)
        assert estimated.input_tokens < 5  # the answer alone would be ~100
    finally:
        await sdk.close()
        await client.aio.aclose()
    assert not scenario.bodies()  # counting never generates


async def test_usage_from_a_worker_of_a_real_daemon(
    start_llproxy: Callable[..., Awaitable[Any]],
    start_upstream: UpstreamFactory,
    tmp_path: Path,
) -> None:
    """`!/usage` in a worker reads the records the master wrote for every worker."""
    upstream = await start_upstream()
    config = write_config(tmp_path / "c.json", [upstream])
    daemon = await start_llproxy(
        "--config", str(config), "--workers", "2", env={"LLPROXY_STATE_DIR": str(tmp_path / "s")}
    )
    sdk = openai.AsyncOpenAI(base_url=f"{daemon.url}/v1", api_key="none", max_retries=0)
    async with sdk:
        for _ in range(4):  # new connections: both workers answer some
            async with openai.AsyncOpenAI(
                base_url=f"{daemon.url}/v1", api_key="none", max_retries=0
            ) as one:
                await one.chat.completions.create(
                    model="fake-model", messages=[{"role": "user", "content": "hi"}]
                )
        deadline = time.monotonic() + 30  # records are flushed by the master each second
        while True:
            done = await sdk.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "!/usage"}]
            )
            text = done.choices[0].message.content or ""
            assert text.startswith(MARK)
            if "- fake-model: 4 requests" in text or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
    assert "- fake-model: 4 requests, 28 prompt tokens" in text, text


def test_config_checks_the_commands_section() -> None:
    config = parse_config({"commands": {"prefix": "::", "disabled_keys": ["ci-*"]}})
    assert (config.commands.prefix, config.commands.disabled_keys) == ("::", ("ci-*",))
    assert parse_config({}).commands.enable
    with pytest.raises(ConfigError, match=r"commands\.prefix: 1 to 16 characters"):
        parse_config({"commands": {"prefix": " !/"}})
    with pytest.raises(ConfigError, match=r"commands\.colour: unknown key"):
        parse_config({"commands": {"colour": 1}})
    with pytest.raises(ConfigError, match=r"commands\.enable: must be a boolean"):
        parse_config({"commands": {"enable": "yes"}})


async def test_long_pieces_of_a_history_are_read_in_linear_time(
    proxy: RunningProxy, scenario: ScenarioUpstream
) -> None:
    """Reminder openers with no end tag, and a `!/set` with a long run of separators, were
    read with regexes that scanned the rest of the text from every character (quadratic:
    a minute of a worker's CPU for a few hundred kB). Both are answered at once now."""
    openers = "<system-reminder>" * 30_000  # 510 kB, well under max_request_bytes
    spaces = " " * 60_000
    history = [
        ("user", f"{openers}\n!/model"),  # no command: the openers are the user's text
        ("assistant", "Noted."),
        ("user", f"!/set(thinking{spaces}loop-detection=false)"),
        ("assistant", f"{MARK}\n\nNot set."),
        ("user", "And now?"),
    ]
    loop = asyncio.get_running_loop()
    started = loop.time()
    said = await openai_chat(proxy)(history, False, "fake-model")
    assert said == "Hello, world!"
    # Did not hang: the quadratic reads took well over a minute here.
    assert loop.time() - started < 20
    (sent,) = scenario.bodies()
    assert [m["content"] for m in sent["messages"]] == [f"{openers}\n!/model", "Noted.", "And now?"]


async def test_a_message_of_many_commands_gets_a_bounded_answer(
    proxy: RunningProxy, scenario: ScenarioUpstream
) -> None:
    """Each command's answer may be long (an unknown one repeats the help): a 300 kB
    message of 100,000 commands was answered with 50 MB (and as many usage queries)."""
    said = await openai_chat(proxy)([("user", "!/x" * 100_000)], False, "fake-model")
    assert said.startswith(MARK) and len(said) < 20_000
    assert said.count("Unknown command") == 8
    assert said.endswith("Only the first 8 commands of a message are answered.")
    assert scenario.bodies() == []


async def test_a_set_of_many_unknown_settings_gets_a_bounded_answer(
    proxy: RunningProxy, scenario: ScenarioUpstream
) -> None:
    """Each unknown setting's line repeats the known names: 50,000 pairs in 440 kB were
    answered with 4.7 MB. A few are told, the rest counted."""
    pairs = " ".join(f"a{i}=1" for i in range(50_000))
    said = await openai_chat(proxy)([("user", f"!/set({pairs})")], False, "fake-model")
    assert said.count("Not set: unknown setting") == 8
    assert said.endswith("(49992 more not set.)") and len(said) < 5_000
    assert scenario.bodies() == []
