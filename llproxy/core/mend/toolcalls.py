"""Tool calls a model wrote as text, made real tool calls: Qwen's and Hermes'
`<tool_call>…</tool_call>`, `<function=name>…</function>` (with Qwen3-coder's
`<parameter=…>` lines), Mistral's `[TOOL_CALLS]`, and a fenced JSON object naming an
offered tool. Arguments that are almost JSON are repaired (json-repair), then checked
against the tool's schema (core/toolschema.py); a call that cannot be made valid, or
names a tool the request did not offer, stays text.

As text streams, what could open a call is held back until it is decided; a call's text
is held whole (at most MAX_CALL_TEXT characters) until it closes; the rest goes on at once.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ..record import RequestRecord
from .thinking import held_prefix

# A call's text beyond this is no call: it goes out as the text it is.
MAX_CALL_TEXT = 64 * 1024
# After a fence's backticks: its language tag and the white space before a `{`.
MAX_FENCE_HEADER = 24
FENCE = "```"
_FENCE_TAGS = ("", "json", "tool_call", "tool_code")
# Each opening and what closes it (None: the answer's end).
OPENINGS: dict[str, str | None] = {
    "<tool_call>": "</tool_call>",
    "<function=": "</function>",
    "[TOOL_CALLS]": None,
    FENCE: FENCE,
}
_PARAMETER, _PARAMETER_END = "<parameter=", "</parameter>"
# json-repair takes time quadratic in some inputs (16 kB of `{a:b,` took 9 s, 64 kB two
# minutes, measured): it is given a text up to this long, and an answer's texts up to
# MAX_REPAIRED_TEXT in all, so an answer cannot hold a worker's loop. What is past them
# stays text; valid JSON of any size is read without it.
MAX_REPAIR_TEXT = 2048
MAX_REPAIRED_TEXT = 8 * 1024


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call made from text: its name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = ""

    def as_message_call(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


Out = str | ToolCall


def offered_tools(body: Mapping[str, Any]) -> dict[str, Any]:
    """The function tools a chat request offers, by name → schema (None: none given);
    {} when it offers none or forbids calls (`tool_choice: "none"`)."""
    if body.get("tool_choice") == "none":
        return {}
    tools: dict[str, Any] = {}
    for tool in body.get("tools") or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            tools[function["name"]] = function.get("parameters")
    return tools


class Repairs:
    """What is left of an answer's budget for json-repair, in characters."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_REPAIRED_TEXT


class ToolCallMender:
    """States: text (scanning; a suffix that may open a call held), header (a fence's
    backticks seen, its language tag not yet), call (an opening seen: its text held)."""

    def __init__(self, tools: Mapping[str, Any], record: RequestRecord) -> None:
        self.tools = tools
        self.outcome = record  # counts what was repaired, and what stayed text
        self.state = "text"
        self.held = ""
        self.opening = ""
        self.calls = 0  # made so far
        self.space = ""  # white space after a call, dropped unless text follows
        self.repairs = Repairs()

    def feed(self, text: str) -> list[Out]:
        out: list[Out] = []
        text = self.held + text
        self.held = ""
        while text:
            if self.state == "text":
                text = self._scan(text, out)
            elif self.state == "header":
                text = self._header(text, out)
            else:
                text = self._call(text, out)
        return out

    def finish(self) -> list[Out]:
        out: list[Out] = []
        held, self.held = self.held, ""
        if self.state == "call":
            closing = OPENINGS[self.opening]
            made = self._made(self.opening, held, closing is not None)
            if made is not None:
                out += made
            else:
                self._text(self.opening + held, out)
        elif held:
            self._text(held, out)
        self.state = "text"
        return out

    def _text(self, text: str, out: list[Out]) -> None:
        if self.calls and not text.strip():
            self.space += text
            return
        if self.space:
            text, self.space = self.space + text, ""
        out.append(text)

    def _scan(self, text: str, out: list[Out]) -> str:
        found = [(at, o) for o in OPENINGS if (at := text.find(o)) >= 0]
        if not found:
            keep = max(held_prefix(text, o) for o in OPENINGS)
            if keep:
                self.held, text = text[-keep:], text[:-keep]
            if text:
                self._text(text, out)
            return ""
        at, opening = min(found)
        if at:
            self._text(text[:at], out)
        self.opening = opening
        self.state = "header" if opening == FENCE else "call"
        return text[at + len(opening) :]

    def _header(self, text: str, out: list[Out]) -> str:
        """After a fence's backticks: a tag of JSON, a line end and a `{` open a call."""
        line, newline, rest = text.partition("\n")
        if not newline or not rest.strip():
            if len(text) > MAX_FENCE_HEADER or line.strip().lower() not in _fence_starts():
                return self._not_a_call(text, out)
            self.held = text
            return ""
        if line.strip().lower() not in _FENCE_TAGS or not rest.lstrip().startswith("{"):
            return self._not_a_call(text, out)
        self.state = "call"
        self.opening = FENCE
        return text  # the header stays in the call's text; the body is its JSON

    def _not_a_call(self, text: str, out: list[Out]) -> str:
        """A fence that opens no call: its backticks as text, and scanning goes on after
        them (the next fence may)."""
        self._text(FENCE, out)
        self.state = "text"
        return text

    def _call(self, text: str, out: list[Out]) -> str:
        closing = OPENINGS[self.opening]
        at = -1 if closing is None else text.find(closing)
        if at < 0 or at > MAX_CALL_TEXT:  # closed past the bound (one long read) too
            if len(text) > MAX_CALL_TEXT:
                self.outcome.tool_calls_unrepaired += 1
                self.state = "text"
                self._text(self.opening + text, out)
                return ""
            self.held = text
            return ""
        assert closing is not None
        body, rest = text[:at], text[at + len(closing) :]
        made = self._made(self.opening, body, True)
        self.state = "text"
        if made is None:
            self._text(self.opening + body + closing, out)
        else:
            out += made
        return rest

    def _made(self, opening: str, body: str, closed: bool) -> list[Out] | None:
        """The calls a call's text stands for; None when it stays text (counted unless
        it was only a fence that names no tool)."""
        if opening == FENCE:
            body = body.partition("\n")[2]
        parsed = _parse(opening, body, self.tools, self.repairs)
        if parsed is None:
            if opening != FENCE or _names_tool(body, self.tools):
                self.outcome.tool_calls_unrepaired += 1
            return None
        self.outcome.tool_calls_repaired += len(parsed)
        self.calls += len(parsed)
        self.space = ""
        return list(parsed)


def _fence_starts() -> set[str]:
    """What a fence's first line may be so far, while it is still being written."""
    return {tag[:n] for tag in _FENCE_TAGS for n in range(len(tag) + 1)}


def _names_tool(body: str, tools: Mapping[str, Any]) -> bool:
    return any(f'"{name}"' in body for name in tools)


def _parse(
    opening: str, body: str, tools: Mapping[str, Any], repairs: Repairs
) -> list[ToolCall] | None:
    """The calls of one call's text, each valid for its tool; None when any is not."""
    body = body.strip()
    if opening == "<function=":
        entries: list[tuple[Any, Any]] | None = [_function_form(body, tools, repairs)]
    elif opening == "<tool_call>" and body.startswith("<function="):
        function = body[len("<function=") :].removesuffix("</function>").strip()
        entries = [_function_form(function, tools, repairs)]
    elif opening == "[TOOL_CALLS]":
        entries = _mistral(body, repairs)
    else:
        entries = _json_calls(_loads(body, repairs))
    if not entries:
        return None
    calls = []
    for name, arguments in entries:
        call = _valid(name, arguments, tools, repairs)
        if call is None:
            return None
        calls.append(call)
    return calls


def _loads(text: str, repairs: Repairs) -> Any:
    """JSON, or what json-repair makes of almost-JSON (a trailing comma, single quotes, a
    brace cut off); None when neither gives anything."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    if not text.strip() or len(text) > min(MAX_REPAIR_TEXT, repairs.left):
        return None
    repairs.left -= len(text)
    # Imported at the first text that needs it: most answers never do (0.5 MB a worker).
    from json_repair import repair_json

    try:
        repaired = repair_json(text, return_objects=True, skip_json_loads=True)
    except Exception:  # a defect of the repairer must not fail the answer: it stays text
        return None
    return repaired if repaired not in ("", None) else None


def _json_calls(value: Any) -> list[tuple[Any, Any]] | None:
    """`{"name": …, "arguments": …}` (or `parameters`), or a list of them."""
    items = value if isinstance(value, list) else [value]
    entries = []
    for item in items:
        if not isinstance(item, dict) or "name" not in item:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        entries.append((item["name"], arguments))
    return entries or None


def _function_form(body: str, tools: Mapping[str, Any], repairs: Repairs) -> tuple[Any, Any]:
    """`name>{json}` (Llama's) or `name>` then `<parameter=key>value</parameter>` lines
    (Qwen3-coder's); a value is JSON where its tool's schema wants other than a string."""
    name, _, rest = body.partition(">")
    rest = rest.strip().removesuffix("</function>").strip()
    name = name.strip()
    if not rest.startswith("<parameter="):
        return name, rest
    schema = tools.get(name)
    properties = schema.get("properties") if isinstance(schema, dict) else None
    properties = properties if isinstance(properties, dict) else {}
    arguments: dict[str, Any] = {}
    for key, value in _parameters(rest):
        wanted = properties.get(key.strip())
        if isinstance(wanted, dict) and wanted.get("type") == "string":
            arguments[key.strip()] = value
        else:
            parsed = _loads(value, repairs)
            arguments[key.strip()] = value if parsed is None else parsed
    return name, arguments


def _parameters(text: str) -> list[tuple[str, str]]:
    """`<parameter=key>value</parameter>`'s (key, value) pairs, a line end after the
    opening and before the closing dropped. Found with find, each closing once: a regex
    with a lazy value read on to the text's end from every unclosed opening (quadratic)."""
    pairs: list[tuple[str, str]] = []
    at = text.find(_PARAMETER)
    while at >= 0:
        start = at + len(_PARAMETER)
        close = text.find(">", start)
        if close < 0:
            break
        key = text[start:close]
        if not key or "\n" in key:  # no parameter's opening: look again past its start
            at = text.find(_PARAMETER, at + 1)
            continue
        end = text.find(_PARAMETER_END, close + 1)
        if end < 0:
            break
        value = text[close + 1 : end]
        value = value.removeprefix("\n")
        value = value.removesuffix("\n")
        pairs.append((key, value))
        at = text.find(_PARAMETER, end + len(_PARAMETER_END))
    return pairs


def _mistral(body: str, repairs: Repairs) -> list[tuple[Any, Any]] | None:
    """`[{"name": …, "arguments": …}]`, or `name[ARGS]{…}` (v11 on), several joined by
    more `[TOOL_CALLS]`."""
    if body.startswith("["):
        return _json_calls(_loads(body, repairs))
    entries: list[tuple[Any, Any]] = []
    for part in body.split("[TOOL_CALLS]"):
        name, marker, arguments = part.partition("[ARGS]")
        if not marker:
            return None
        entries.append((name.strip(), arguments))
    return entries


def _valid(
    name: Any, arguments: Any, tools: Mapping[str, Any], repairs: Repairs
) -> ToolCall | None:
    """The call when its tool was offered and its arguments are (or repair into) an
    object its schema accepts."""
    if not isinstance(name, str) or name not in tools:
        return None
    if isinstance(arguments, str):
        arguments = _loads(arguments, repairs) if arguments.strip() else {}
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    schema = tools[name]
    if isinstance(schema, dict):
        # jsonschema and RE2 come with the first call checked: 4.6 MB a worker would hold
        # from its start for what only tool calls written as text need.
        from ..toolschema import SchemaRefusal, check

        try:
            check(schema, arguments)
        except SchemaRefusal:
            return None
    encoded = orjson.dumps(arguments).decode()
    return ToolCall(name, encoded, f"call_{secrets.token_hex(12)}")
