"""`llproxy operator` on a pseudo-terminal: a person's keystrokes on one side, the openai
SDK on the other, a real llproxy between them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import llproxy
from llproxy.server.operator import close_operator_sockets
from llproxy.stores.sqlite import KeyStore

from .conftest import ProxyFactory, UpstreamFactory
from .operator_client import WEATHER, Desk, open_desk
from .process import LlproxyCommand

WAIT = 20.0
# The llproxy these tests import, whatever the current directory or the installed one.
SOURCE = str(Path(llproxy.__file__).resolve().parent.parent)
PICTURE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
ASK = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "text", "text": "Which city is this?"}, PICTURE]},
]
EARLIER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Bergen"}'},
}
ASK_WEATHER = [
    {"role": "user", "content": "Weather in Bergen?"},
    {"role": "assistant", "content": None, "tool_calls": [EARLIER_CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "rain, 9 degrees"},
    {"role": "user", "content": "And in Oslo?"},
]
Chunks = AsyncIterator[Any]


@pytest.fixture
async def desk(start_upstream: UpstreamFactory, start_proxy: ProxyFactory, tmp_path: Path) -> Desk:
    upstream = await start_upstream()
    operator = {"operator": "human", "tags": ["support"]}
    return await open_desk(
        start_proxy, tmp_path / "state", [upstream.endpoint(), operator], upstream
    )


Terminal = Callable[[str, str], LlproxyCommand]


@pytest.fixture
async def terminal() -> AsyncIterator[Terminal]:
    """Start `llproxy operator` on a pseudo-terminal; every one is killed at the end."""
    started: list[LlproxyCommand] = []

    def start(url: str, token: str) -> LlproxyCommand:
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [SOURCE, os.environ.get("PYTHONPATH")]))}
        process = LlproxyCommand(
            ["operator", "--url", url, "--token", token], env=env, terminal=True
        )
        started.append(process)
        process.start()
        return process

    yield start
    for process in started:
        process.kill()


async def next_chunk(chunks: Chunks) -> Any:
    return await asyncio.wait_for(anext(chunks), WAIT)


async def connected_operator(desk: Desk, terminal: Terminal) -> LlproxyCommand:
    """alice's terminal, once it says it is connected."""
    alice = terminal(desk.proxy.url, desk.keys["alice"])
    await alice.wait_for(r"connected to \S+ as alice")
    return alice


async def streamed_question(desk: Desk) -> Chunks:
    """The chunks of a streamed question to the operator model."""
    stream = await desk.client().chat.completions.create(
        model="human:support", messages=ASK, stream=True
    )
    return stream.__aiter__()


async def claim_next(operator: LlproxyCommand, command: str = "{}") -> None:
    """Claim the next request to arrive, typing `command` with its number."""
    arrived = await operator.wait_for(r"new request #(\d+) for human:support")
    operator.write(command.format(arrived.group(1)) + "\n")
    await operator.wait_for(r"answering #\d+", after=arrived.end())


async def test_lines_reach_the_client_as_they_are_typed(desk: Desk, terminal: Terminal) -> None:
    alice = await connected_operator(desk, terminal)
    chunks = await streamed_question(desk)
    assert (await next_chunk(chunks)).choices[0].delta.role == "assistant"
    mark = len(alice.output)
    await claim_next(alice)
    conversation = r"system\s+Answer briefly\.\s+user\s+Which city is this\?\s+\[image\]"
    await alice.wait_for(conversation, after=mark)
    alice.write("It is Oslo,\n")
    # Each line reaches the client as soon as it is typed, long before the finish.
    first = (await next_chunk(chunks)).choices[0].delta.content
    assert first == "It is Oslo,"
    # An empty line goes with the next line: a paragraph, and never a trailing newline.
    alice.write("\nthe capital of Norway.\n\n")
    second = (await next_chunk(chunks)).choices[0].delta.content
    assert second == "\n\nthe capital of Norway."
    mark = len(alice.output)
    alice.write("/finish\n")
    rest = [chunk async for chunk in chunks]
    text = first + second + "".join(c.choices[0].delta.content or "" for c in rest)
    assert text == "It is Oslo,\n\nthe capital of Norway."
    assert rest[-1].choices[0].finish_reason == "stop"
    await alice.wait_for(r"#\d+ finished \(stop\)", after=mark)
    assert alice.proc is not None and alice.proc.poll() is None
    alice.write("/quit\n")
    assert await alice.wait_exit(WAIT) == 0


async def test_the_queue_shows_the_servers_numbers(desk: Desk, terminal: Terminal) -> None:
    chunks = await streamed_question(desk)
    assert (await next_chunk(chunks)).choices[0].delta.role == "assistant"
    alice = await connected_operator(desk, terminal)
    await alice.wait_for(r"1 waiting, the oldest for \d:\d\d; 1 operator online")
    alice.write("/quit\n")
    assert await alice.wait_exit(WAIT) == 0


async def test_a_key_that_is_no_operator_key_is_refused(desk: Desk, terminal: Terminal) -> None:
    for token in ("llp-not-a-key-at-all", desk.keys["client"]):
        process = terminal(desk.proxy.url, token)
        assert await process.wait_exit(WAIT) == 1
        await process.wait_for("not an operator key")
        assert token not in process.output


async def test_a_tool_call_is_checked_then_sent(desk: Desk, terminal: Terminal) -> None:
    alice = await connected_operator(desk, terminal)
    asking = asyncio.ensure_future(
        desk.client().chat.completions.create(
            model="human:support", messages=ASK_WEATHER, tools=[WEATHER]
        )
    )
    mark = len(alice.output)
    await claim_next(alice, "claim {}")
    for shown in (
        r"get_weather\(city: string, days\?: integer, units\?: \"metric\"\|\"imperial\"\)"
        r"\s+The weather in a city",
        r"assistant\s+→ get_weather \{\"city\":\"Bergen\"\}\s+\[call_1\]",
        r"tool call_1\s+rain, 9 degrees",
        r"user\s+And in Oslo\?",
    ):
        await alice.wait_for(shown, after=mark)
    mark = len(alice.output)
    alice.write('/tool get_weather {"days": 1}\n')
    await alice.wait_for(r"tool_call #\d+ refused: .*'city' is a required property", after=mark)
    alice.write('/tool get_weather {"city": "Oslo"}\n')
    await alice.wait_for(r"tool call sent: get_weather \[call_\w+\]", after=mark)
    alice.write("/finish\n")
    answer = await asyncio.wait_for(asking, WAIT)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]
    assert [(name, json.loads(arguments)) for name, arguments in calls] == [
        ("get_weather", {"city": "Oslo"})
    ]
    await alice.wait_for(r"#\d+ finished \(tool_calls\)", after=mark)
    alice.write("\x04")  # Ctrl-D: the end of input
    assert await alice.wait_exit(WAIT) == 0


async def test_the_answer_goes_on_after_a_reconnect(desk: Desk, terminal: Terminal) -> None:
    alice = await connected_operator(desk, terminal)
    chunks = await streamed_question(desk)
    await next_chunk(chunks)
    await claim_next(alice)
    alice.write("Before\n")
    assert (await next_chunk(chunks)).choices[0].delta.content == "Before"
    mark = len(alice.output)
    await close_operator_sockets(desk.proxy.state)  # as a retiring worker does
    await alice.wait_for(r"connection lost", after=mark)
    # Typed while the connection is down, or just back: either way it is sent once the
    # request is claimed again.
    alice.write("after.\n")
    await alice.wait_for(r"#\d+ is yours again", after=mark)
    assert (await next_chunk(chunks)).choices[0].delta.content == "\nafter."
    alice.write("/finish\n")
    rest = [chunk async for chunk in chunks]
    assert rest[-1].choices[0].finish_reason == "stop"
    alice.write("/quit\n")
    assert await alice.wait_exit(WAIT) == 0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--url", "http://127.0.0.1:9", "--token", ""], "no operator key"),
        (["--url", "ftp://example", "--token", "k"], "Invalid value for --url"),
    ],
)
def test_usage_errors_exit_2(args: list[str], says: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLPROXY_")}
    done = subprocess.run(
        [sys.executable, "-m", "llproxy", "operator", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={**env, "PYTHONPATH": SOURCE},
    )
    assert done.returncode == 2, done.stderr
    assert says in done.stderr


async def test_a_refused_key_fails_even_when_input_ends_at_once(desk: Desk) -> None:
    """`llproxy operator --token BAD </dev/null`: the refusal, not the end of input,
    decides the exit status."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [SOURCE, os.environ.get("PYTHONPATH")]))}
    for token in ("llp-not-a-key-at-all", desk.keys["client"]):
        process = LlproxyCommand(["operator", "--url", desk.proxy.url, "--token", token], env=env)
        process.start()
        try:
            assert await process.wait_exit(WAIT) == 1
            await process.wait_for("not an operator key")
        finally:
            process.kill()
    good = LlproxyCommand(
        ["operator", "--url", desk.proxy.url, "--token", desk.keys["alice"]], env=env
    )
    good.start()
    try:
        assert await good.wait_exit(WAIT) == 0  # a good key and no input: a clean leave
    finally:
        good.kill()


async def test_lines_after_a_surprise_are_not_commands_by_accident(
    desk: Desk, terminal: Terminal
) -> None:
    """The client leaves while the operator types: the next line ("1") was meant for it,
    so it is neither sent nor run; and in the queue "2 apples" claims nothing."""
    alice = await connected_operator(desk, terminal)
    stream = await desk.client().chat.completions.create(
        model="human:support", messages=ASK, stream=True
    )
    await next_chunk(stream.__aiter__())
    await claim_next(alice)
    mark = len(alice.output)
    other = asyncio.ensure_future(
        desk.client().chat.completions.create(model="human:support", messages=ASK)
    )
    second = await alice.wait_for(r"new request #(\d+) for human:support", after=mark)
    number = second.group(1)
    await stream.close()  # the client leaves
    await alice.wait_for(r"the client left", after=mark)
    mark = len(alice.output)
    alice.write(f"{number}\n")
    await alice.wait_for(r"had ended: this line was not sent, nor taken as a command", after=mark)
    alice.write(f"{number} apples\n")
    await alice.wait_for(rf"unknown command '{number}'", after=mark)
    assert "answering" not in alice.output[mark:]
    alice.write(f"{number}\n")
    await alice.wait_for(rf"answering #{number}", after=mark)
    alice.write("/reject not today\n")
    with pytest.raises(Exception, match="not today"):
        await asyncio.wait_for(other, WAIT)
    alice.write("/quit\n")
    assert await alice.wait_exit(WAIT) == 0


async def test_the_prompt_shows_the_mode_and_notices_never_cut_a_half_typed_line(
    desk: Desk, terminal: Terminal
) -> None:
    alice = await connected_operator(desk, terminal)
    await alice.wait_for(r"queue · N \+ Enter claims #N, help lists commands > ")
    chunks = await streamed_question(desk)
    await next_chunk(chunks)
    await claim_next(alice)
    await alice.wait_for(r"answering #\d+ · Enter sends the line, /finish ends > ")
    alice.write("half a li")  # no Enter yet: then a notice comes
    mark = len(alice.output)
    other = asyncio.ensure_future(
        desk.client().chat.completions.create(model="human:support", messages=ASK)
    )
    # The notice goes above; the prompt and the half-typed text are drawn again below it.
    await alice.wait_for(
        r"new request #\d+ for human:support[^\n]*\n[^\n]*"
        r"answering #\d+ · Enter sends the line, /finish ends > half a li",
        after=mark,
    )
    alice.write("ne\n")
    assert (await next_chunk(chunks)).choices[0].delta.content == "half a line"
    alice.write("/finish\n")
    await alice.wait_for(r"queue · N \+ Enter claims #N", after=mark)
    other.cancel()
    alice.write("/quit\n")
    assert await alice.wait_exit(WAIT) == 0


async def test_the_queue_is_drawn_again_in_place_with_moving_countdowns(
    desk: Desk, terminal: Terminal
) -> None:
    chunks = await streamed_question(desk)
    await next_chunk(chunks)
    alice = await connected_operator(desk, terminal)
    first = await alice.wait_for(r"│\s+(\d+)s │")
    # Each second the table is drawn over itself: the cursor goes up its height and the
    # screen is cleared from there, and the countdown has moved.
    again = await alice.wait_for(r"\x1b\[(\d+)A\r\x1b\[J", raw=True)
    table_height = int(again.group(1))
    assert 5 <= table_height <= 12
    at, left = first.end(), int(first.group(1))
    for _ in range(30):  # each drawing after the first second shows less time left
        later = await alice.wait_for(r"│\s+(\d+)s │", after=at)
        at += later.end()  # a match's offsets count from `after`
        if int(later.group(1)) < left:
            break
    assert int(later.group(1)) < left
    alice.write("/quit\n")
    assert await alice.wait_exit(WAIT) == 0


async def test_a_key_revoked_while_connected_ends_the_terminal_with_the_reason(
    desk: Desk, terminal: Terminal
) -> None:
    alice = await connected_operator(desk, terminal)
    with KeyStore(desk.state) as store:
        assert store.revoke("alice") is not None
    assert await alice.wait_exit(WAIT) == 1
    await alice.wait_for("the server refused the key: the operator key was revoked")
