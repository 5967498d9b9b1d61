"""The mending and request stages' shortcuts for the usual request with nothing to do: a
whole answer no stage could change is not run through them (`_untouched`), and a chat
with no command and no tool call in its history is read in one pass. Each shortcut
must give exactly what the full stages give."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from llproxy.core.commands import _answered, _commands, read
from llproxy.core.mend.plan import Plan
from llproxy.core.mend.whole import _mended, _untouched
from llproxy.core.record import RequestRecord

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
PIECES = [
    "Hello",
    " ",
    "\n",
    "x",
    "<",
    "[",
    "`",
    "<think>",
    "</think>",
    "```json\n",
    "```",
    "[TOOL_CALLS]",
    "<tool_call>",
    "</tool_call>",
    "<function=get_weather>",
    "</function>",
    CALL,
]
texts = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)
plans = st.builds(
    Plan,
    tools=st.sampled_from([{}, {"get_weather": SCHEMA}]),
    thinking=st.booleans(),
    think_open=st.booleans(),
    show_thinking=st.booleans(),
    loops=st.none(),
)


@settings(max_examples=400, deadline=None)
@given(text=texts, plan=plans, reasoning=st.sampled_from([None, "", "hm"]))
def test_a_whole_answer_the_shortcut_skips_is_one_the_stages_leave_as_it_is(
    text: str, plan: Plan, reasoning: str | None
) -> None:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    if not _untouched(message, text, plan):
        return
    before = copy.deepcopy(choice)
    assert not _mended(choice, message, text, plan, RequestRecord())
    assert choice == before


def test_the_shortcut_takes_the_usual_answer() -> None:
    # An answer with nothing for a stage, under every stage on: not run through them.
    plan = Plan({"get_weather": SCHEMA}, True, False, False, None)
    message = {"role": "assistant", "content": "Hello! How can I help you today?"}
    assert _untouched(message, message["content"], plan)
    assert not _untouched(message, "<think>hm</think>Hello", plan)


REMINDER = "<system-reminder>Be careful.</system-reminder>"
LEADS = ["", " ", " !/", "\n [llproxy]", "!/", "[llproxy]", "[", "!", "x", REMINDER + "!/"]
contents = st.one_of(
    st.builds(
        lambda lead, rest: lead + rest,
        st.sampled_from(LEADS),
        st.sampled_from(["", "help", "set(thinking=false)", "model(m)", " hello", "Noted."]),
    ),
    st.builds(lambda text: [{"type": "text", "text": text}], st.sampled_from(["!/help", "hi"])),
    st.none(),
)
histories = st.lists(
    st.one_of(
        st.builds(
            lambda role, content: {"role": role, "content": content},
            st.sampled_from(["user", "assistant", "system", "tool"]),
            contents,
        ),
        st.just("not a message"),
    ),
    max_size=6,
)


@settings(max_examples=400, deadline=None)
@given(messages=histories)
def test_a_history_read_in_one_pass_finds_what_each_message_read_whole_finds(
    messages: list[Any],
) -> None:
    history = read(messages, "!/")
    commands = [
        i
        for i, m in enumerate(messages)
        if isinstance(m, dict) and m.get("role") == "user" and _commands(m, "!/") is not None
    ]
    answers = [
        i
        for i, m in enumerate(messages)
        if isinstance(m, dict) and m.get("role") == "assistant" and _answered(m)
    ]
    dropped = set(commands) | set(answers)
    assert history.messages == [m for i, m in enumerate(messages) if i not in dropped]
    assert (history.command is not None) == (len(messages) - 1 in commands)
