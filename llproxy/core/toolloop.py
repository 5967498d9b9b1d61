"""The same tool called with the same arguments again and again: seen in the tool calls of
the assistant messages a client sends back, the last run of identical calls is counted
(a user's message or a model's answer without tool calls ends a run). At `repeats` in a
row, `warn` adds a note for the model to the system prompt and `break` has llproxy answer
instead of the model, so an agent on a small model stops spending its token budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

# The first words of the answer `break` gives: the model reads it on the next turn, so it
# stays in the history (unlike command answers).
BREAK_MARK = "[llproxy: tool loop]"
_ARGUMENTS_SHOWN = 200


@dataclass(frozen=True, slots=True)
class Run:
    """The last run of identical tool calls: the call, and how many times in a row."""

    name: str
    arguments: str  # canonical JSON where it parses, else as sent
    count: int


def _canonical(arguments: Any) -> str:
    value = arguments
    if isinstance(arguments, str):
        try:
            value = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return arguments.strip()
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # orjson.JSONEncodeError: nesting too deep to write
        return str(arguments)


def last_run(messages: Sequence[Any]) -> Run | None:
    """The run of identical tool calls that ends the conversation, read from its end."""
    run: Run | None = None
    for message in reversed(messages):
        if not isinstance(message, dict):
            return run
        role = message.get("role")
        if role == "tool":
            continue
        calls = message.get("tool_calls")
        if role != "assistant" or not isinstance(calls, list) or not calls:
            return run
        for call in reversed(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                return run
            name, arguments = str(function.get("name")), _canonical(function.get("arguments"))
            if run is None:
                run = Run(name, arguments, 1)
            elif (run.name, run.arguments) == (name, arguments):
                run = Run(name, arguments, run.count + 1)
            else:
                return run
    return run


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str  # "warn" | "break"
    text: str  # the note for the model, or llproxy's answer


def check(messages: Sequence[Any], mode: str, repeats: int) -> Verdict | None:
    """What to do about the conversation's last run of tool calls under `mode`."""
    if mode == "off":
        return None
    run = last_run(messages)
    if run is None or run.count < repeats:
        return None
    shown = run.arguments[:_ARGUMENTS_SHOWN]
    shown += "…" if len(run.arguments) > _ARGUMENTS_SHOWN else ""
    what = (
        f"the tool `{run.name}` was called {run.count} times in a row with the same "
        f"arguments ({shown})"
    )
    if mode == "break":
        return Verdict(
            "break",
            f"{BREAK_MARK} Stopped: {what}. Calling it again gives the same result; "
            "llproxy did not send this turn to the model. Change the arguments, use another "
            "tool, or tell the user what is blocking you.",
        )
    return Verdict(
        "warn",
        f"Note from llproxy: {what}. Calling it again gives the same result: change the "
        "arguments, use another tool, or answer the user with what you have.",
    )


def with_note(messages: Sequence[Any], note: str) -> list[Any]:
    """The messages with a note for the model added to the system prompt: at its end when
    there is one, else as a system message first (templates such as Qwen's refuse a
    system message anywhere else)."""
    out = list(messages)
    first = out[0] if out else None
    if isinstance(first, dict) and first.get("role") in ("system", "developer"):
        content = first.get("content")
        if isinstance(content, str):
            out[0] = {**first, "content": f"{content}\n\n{note}"}
            return out
        if isinstance(content, list):
            out[0] = {**first, "content": [*content, {"type": "text", "text": note}]}
            return out
    return [{"role": "system", "content": note}, *out]
