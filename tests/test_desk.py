"""The operators' desk as a state machine, driven directly: an answer's size is bounded,
appending to it stays linear, and a command the desk trips over is a refusal."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from rich.console import Console

from llproxy.core.desk import (
    TICK_SECONDS,
    Desk,
    Event,
    HeldDesk,
    Ticket,
    new_ticket_id,
    tool_problems,
)
from llproxy.ui.operator_view import QueuedRequest, conversation

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


class Seen:
    """What one side of the desk was told."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def last(self) -> Event:
        return self.events[-1]


def ticket(max_answer_bytes: int, tools: list[Any] | None = None) -> Ticket:
    return Ticket(
        id=new_ticket_id(),
        model="human:support",
        asked="human:support",
        client="client",
        dialect="openai",
        stream=True,
        messages=[{"role": "user", "content": "hello"}],
        tools=tools or [],
        tool_choice=None,
        max_tokens=None,
        queue_timeout=60.0,
        idle_timeout=60.0,
        fallback=None,
        max_answer_bytes=max_answer_bytes,
    )


def claimed(
    desk: Desk, max_answer_bytes: int, tools: list[Any] | None = None
) -> tuple[str, Seen, Seen]:
    client, operator = Seen(), Seen()
    request = ticket(max_answer_bytes, tools)
    desk.submit(request, client)
    desk.attach("conn-1", "alice", (), operator)
    desk.command("conn-1", {"type": "claim", "id": 1, "request": request.id})
    assert operator.last()["type"] == "ack"
    return request.id, client, operator


def test_an_answer_past_its_bound_is_refused_and_what_came_before_stays() -> None:
    desk = Desk()
    request, client, operator = claimed(desk, 1000, [WEATHER])
    desk.command("conn-1", {"type": "delta", "id": 2, "request": request, "text": "é" * 300})
    assert operator.last()["type"] == "ack"  # 600 bytes, in 300 characters
    desk.command("conn-1", {"type": "delta", "id": 3, "request": request, "text": "x" * 401})
    refused = operator.last()
    assert refused["type"] == "refused" and "exceed 1000 bytes (600 sent)" in refused["reason"]
    desk.command("conn-1", {"type": "delta", "id": 4, "request": request, "text": "x" * 300})
    assert operator.last()["length"] == 600  # characters, as offsets count them
    # Tool calls count too: the arguments would take the answer past its bound.
    arguments = {"city": "y" * 200}
    call = {"type": "tool_call", "id": 5, "request": request, "name": "get_weather"}
    desk.command("conn-1", {**call, "arguments": arguments})
    assert operator.last()["type"] == "refused"
    desk.command("conn-1", {**call, "arguments": {"city": "Oslo"}})
    assert operator.last()["type"] == "ack"
    desk.command("conn-1", {"type": "finish", "id": 6, "request": request})
    texts = [e["text"] for e in client.events if e["type"] == "delta"]
    assert "".join(texts) == "é" * 300 + "x" * 300
    assert client.last() == {"type": "finish", "reason": "tool_calls"}


@pytest.mark.timeout(30)  # appending by copying the whole text each time takes minutes
def test_many_deltas_append_in_linear_time() -> None:
    desk = Desk()
    piece = "z" * 1024
    request, client, operator = claimed(desk, 64 * 1024 * 1024)
    for i in range(40_000):
        desk.command("conn-1", {"type": "delta", "id": i, "request": request, "text": piece})
    assert operator.last() == {
        "type": "ack",
        "id": 39_999,
        "command": "delta",
        "request": request,
        "deadline_in": 60.0,
        "length": 40_000 * 1024,
    }
    # An operator reconnecting is given the whole answer so far.
    again = Seen()
    desk.attach("conn-2", "alice", (), again)
    desk.command("conn-2", {"type": "claim", "id": "again", "request": request})
    assert again.last()["text"] == piece * 40_000
    assert [e["type"] for e in client.events[:2]] == ["claimed", "delta"]
    assert len(client.events) == 1 + 40_000 + 1  # claimed, every delta, claimed again


def test_a_command_the_desk_trips_over_is_refused_and_the_desk_goes_on() -> None:
    def exists(name: str) -> bool:
        raise RuntimeError("the registry could not be read")

    desk = Desk(exists=exists)
    request, client, operator = claimed(desk, 1000, ["not a tool", WEATHER])
    desk.command("conn-1", {"type": "handoff", "id": 2, "request": request, "model": "m"})
    refused = operator.last()
    assert refused["type"] == "refused" and "RuntimeError" in refused["reason"]
    # A client's tools that are not objects are skipped when naming what it offers.
    desk.command("conn-1", {"type": "tool_call", "id": 3, "request": request, "name": "rm"})
    refused = operator.last()
    assert refused["reason"] == "no tool 'rm' in this request; it offers ['get_weather']"
    desk.command("conn-1", {"type": "delta", "id": 4, "request": request, "text": "fine"})
    desk.command("conn-1", {"type": "finish", "id": 5, "request": request})
    assert client.last() == {"type": "finish", "reason": "stop"}


async def test_the_desk_clock_survives_a_tick_that_fails() -> None:
    """The master's desk runs one clock task for every ticket's deadline: a tick that
    raises is logged, and the next one still times requests out."""
    failing = {"on": False}

    def clock() -> float:
        if failing["on"]:
            raise OSError("the clock could not be read")
        return time.monotonic()

    desk = HeldDesk(clock=clock)
    desk.start()
    try:
        failing["on"] = True
        await asyncio.sleep(TICK_SECONDS * 2)  # at least one tick fails
        failing["on"] = False
        client = Seen()
        request = ticket(1000)
        request.queue_timeout = 0.1
        desk.submit(request, client)
        async with asyncio.timeout(10):
            while not client.events:
                await asyncio.sleep(0.05)
        assert client.last()["type"] == "timeout"
    finally:
        await desk.close()


def test_tools_whose_schema_cannot_check_a_call_are_named_when_the_request_arrives() -> None:
    def tool(name: str, parameters: Any) -> dict[str, Any]:
        return {"type": "function", "function": {"name": name, "parameters": parameters}}

    tools = [
        WEATHER,
        tool("backreference", {"properties": {"a": {"pattern": r"(a)\1"}}}),
        tool(
            "unevaluated",
            {"patternProperties": {"^x": {}}, "unevaluatedProperties": False},
        ),
        tool("huge", {"enum": list(range(20_000))}),
        tool("remote", {"$ref": "http://127.0.0.1:9/schema.json"}),  # seen at a call
        "not a tool",
    ]
    problems = tool_problems(tools)
    assert set(problems) == {"backreference", "unevaluated", "huge"}
    assert "is not a 'regex'" in problems["backreference"]
    assert "too large" in problems["huge"]
    desk = Desk()
    request, _, operator = claimed(desk, 1000, tools)
    desk.tickets[request].tool_problems = problems
    call = {"type": "tool_call", "id": 2, "request": request, "arguments": {}}
    desk.command("conn-1", {**call, "name": "backreference"})
    assert operator.last()["reason"] == problems["backreference"]
    desk.command("conn-1", {**call, "name": "remote"})
    assert "does not resolve inside the schema" in operator.last()["reason"]


def test_the_terminal_shows_which_tools_cannot_be_called() -> None:
    data = {"id": "req_1", "model": "human:support", "messages": [], "tools": [WEATHER]}
    data["tool_problems"] = {"get_weather": "the tool's schema is nested too deep"}
    console = Console(record=True, width=200)
    console.print(conversation(QueuedRequest(1, data, None)))
    assert "get_weather cannot be called: the tool's schema is nested too deep" in (
        console.export_text()
    )
