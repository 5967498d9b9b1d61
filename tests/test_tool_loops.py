"""The same tool called with the same arguments again and again, as the history a client
sends back shows it: `warn` adds a note for the model to its system prompt, `break` has
llproxy answer instead of a forward (the upstream's log stays empty), `off` leaves the
turn alone; the mode comes from the config or the conversation's own `!/set`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import pytest

from llproxy.config import ConfigError, parse_config
from llproxy.core.toolloop import BREAK_MARK, last_run

from .conftest import ProxyFactory, RunningProxy, scenario_endpoint
from .scenario_upstream import ScenarioUpstream

READ = {
    "type": "function",
    "function": {
        "name": "read_file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
    },
}


def call(i: int, arguments: str, name: str = "read_file") -> list[dict[str, Any]]:
    """One assistant tool call and its result."""
    function = {"name": name, "arguments": arguments}
    return [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": f"call_{i}", "type": "function", "function": function}],
        },
        {"role": "tool", "tool_call_id": f"call_{i}", "content": "error: file is busy"},
    ]


def looping(times: int, arguments: str = '{"path": "a.txt"}') -> list[dict[str, Any]]:
    messages = [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "Read a.txt"},
    ]
    for i in range(times):
        messages += call(i, arguments)
    return messages


async def started(start_proxy: ProxyFactory, scenario: ScenarioUpstream, **top: Any) -> Any:
    proxy = await start_proxy([scenario_endpoint(scenario)], **top)
    await proxy.rescan()
    return proxy


async def chat(proxy: RunningProxy, messages: list[dict[str, Any]], stream: bool = False) -> str:
    sdk = proxy.client()
    if not stream:
        done = await sdk.chat.completions.create(
            model="fake-model", messages=messages, tools=[READ]
        )  # type: ignore[call-overload]
        return done.choices[0].message.content or ""
    parts = await sdk.chat.completions.create(
        model="fake-model", messages=messages, tools=[READ], stream=True
    )  # type: ignore[call-overload]
    return "".join([c.choices[0].delta.content or "" async for c in parts if c.choices])


def test_the_last_run_is_counted_from_the_end() -> None:
    run = last_run(looping(4))
    assert run is not None and (run.name, run.count) == ("read_file", 4)
    # The same arguments in another key order, or spaced otherwise, are the same call.
    mixed = looping(1, '{"a": 1, "b": 2}') + call(1, '{"b":2,"a":1}') + call(2, '{"a": 1, "b": 2}')
    assert last_run(mixed).count == 3  # type: ignore[union-attr]
    # Other arguments, another tool, a user's word or a text answer end the run.
    assert last_run(looping(3) + call(9, '{"path": "b.txt"}')).count == 1  # type: ignore[union-attr]
    assert last_run(looping(3) + call(9, '{"path": "a.txt"}', "stat")).count == 1  # type: ignore[union-attr]
    spoke = [*looping(3), {"role": "user", "content": "go on"}, *call(7, '{"path": "a.txt"}')]
    assert last_run(spoke).count == 1  # type: ignore[union-attr]
    answered = [*looping(3), {"role": "assistant", "content": "Busy."}]
    assert last_run(answered) is None
    assert last_run([{"role": "user", "content": "hi"}]) is None


async def test_warn_adds_a_note_to_the_system_prompt_at_the_limit(
    start_proxy: ProxyFactory, scenario: ScenarioUpstream
) -> None:
    proxy = await started(start_proxy, scenario)  # the default: warn at 5
    assert await chat(proxy, looping(4)) == "Hello, world!"
    assert scenario.bodies()[-1]["messages"] == looping(4)
    assert await chat(proxy, looping(5), stream=True) == "Hello, world!"
    sent = scenario.bodies()[-1]["messages"]
    assert sent[1:] == looping(5)[1:]
    system = sent[0]["content"]
    assert system.startswith("You are a coding agent.\n\nNote from llproxy: the tool `read_file`")
    assert "5 times in a row" in system and '{"path":"a.txt"}' in system
    # Without a system prompt, the note is one, first.
    assert await chat(proxy, looping(6)[1:]) == "Hello, world!"
    first = scenario.bodies()[-1]["messages"][0]
    assert first["role"] == "system" and "6 times in a row" in first["content"]
    body = await proxy.state.metrics()
    assert b'llproxy_request_stages_total{stage="tool_loop_warn"} 2.0' in body


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_break_answers_instead_of_the_model(
    start_proxy: ProxyFactory, scenario: ScenarioUpstream, stream: bool
) -> None:
    proxy = await started(start_proxy, scenario, tool_loops={"mode": "break", "repeats": 3})
    assert await chat(proxy, looping(2), stream) == "Hello, world!"
    answer = await chat(proxy, looping(3), stream)
    assert answer.startswith(BREAK_MARK) and "`read_file` was called 3 times" in answer
    assert len(scenario.bodies()) == 1  # the loop went nowhere
    # An Anthropic agent's loop (tool_use and tool_result blocks) is the same loop.
    sdk = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="none", max_retries=0)
    messages: list[Any] = [{"role": "user", "content": "Read a.txt"}]
    for i in range(3):
        use = {"type": "tool_use", "id": f"toolu_{i}", "name": "read_file", "input": {"path": "a"}}
        result = {"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": "busy"}
        messages += [{"role": "assistant", "content": [use]}, {"role": "user", "content": [result]}]
    tools: Any = [{"name": "read_file", "input_schema": {"type": "object"}}]
    async with sdk.messages.stream(
        model="fake-model", max_tokens=50, messages=messages, tools=tools
    ) as events:
        final = await events.get_final_message()
    await sdk.close()
    assert final.content[0].text.startswith(BREAK_MARK)  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert len(scenario.bodies()) == 1


async def test_off_and_the_conversations_own_setting(
    start_proxy: ProxyFactory, scenario: ScenarioUpstream, tmp_path: Path
) -> None:
    proxy = await started(start_proxy, scenario, tool_loops={"mode": "off"})
    assert await chat(proxy, looping(9)) == "Hello, world!"
    assert scenario.bodies()[-1]["messages"] == looping(9)
    # The conversation set `break` for itself earlier on: it wins over the config's.
    setting = [
        {"role": "user", "content": "!/set(tool-loops=break)"},
        {"role": "assistant", "content": "[llproxy]\n\ntool-loops = break for this conversation."},
    ]
    answer = await chat(proxy, [*setting, *looping(5)[1:]])
    assert answer.startswith(BREAK_MARK)
    assert len(scenario.bodies()) == 1


def test_config_checks_the_tool_loops_section() -> None:
    config = parse_config({"tool_loops": {"mode": "break", "repeats": 3}})
    assert (config.tool_loops.mode, config.tool_loops.repeats) == ("break", 3)
    assert (parse_config({}).tool_loops.mode, parse_config({}).tool_loops.repeats) == ("warn", 5)
    with pytest.raises(ConfigError, match=r"tool_loops\.mode: must be one of off, warn, break"):
        parse_config({"tool_loops": {"mode": "stop"}})
    with pytest.raises(ConfigError, match=r"tool_loops\.repeats: must be at least 2"):
        parse_config({"tool_loops": {"repeats": 1}})
