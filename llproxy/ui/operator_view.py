"""How `llproxy operator` shows things: the queue as a table, and a request's conversation
(roles in colour, tool calls, tool results, the tools offered). Everything the server
sends came from a client, so it is shown as plain text with control characters escaped:
a message cannot restyle or take over the operator's terminal."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

Event = dict[str, Any]

ROLE_STYLES = {"system": "magenta", "user": "green", "assistant": "cyan", "tool": "yellow"}
# C0 and C1 controls but newline and tab: escape sequences would drive the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_PREVIEW = 40


@dataclass
class QueuedRequest:
    """A request as this terminal knows it: the server's fields, and a number that stays
    the same while it lives, so `claim 2` never means another request after a redraw."""

    number: int
    data: Event
    deadline_at: float | None  # monotonic; None when the server did not say
    queue_timeout: float | None = None  # known when it was seen arriving

    @property
    def id(self) -> str:
        return str(self.data["id"])

    def seconds_left(self) -> str:
        if self.deadline_at is None:
            return "-"
        return f"{max(0.0, self.deadline_at - time.monotonic()):.0f}s"


def printable(value: Any) -> str:
    text = value if isinstance(value, str) else "" if value is None else str(value)
    text = text.replace("\r\n", "\n")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def content_text(content: Any) -> str:
    """A message's content (a string, or OpenAI parts) as text; pictures as [image]."""
    if content is None or isinstance(content, str):
        return printable(content)
    if not isinstance(content, list):
        return printable(orjson.dumps(content).decode())
    return "\n".join(_part_text(part) for part in content)


def _part_text(part: Any) -> str:
    if not isinstance(part, dict):
        return printable(part)
    kind = part.get("type")
    if kind == "text":
        return printable(part.get("text"))
    if kind == "image_url":
        return "[image]"
    return f"[{printable(kind)}]"


def preview(request: QueuedRequest) -> str:
    """The last user message, shortened: what the request is about, in the queue."""
    users = [m for m in request.data.get("messages") or () if isinstance(m, dict)]
    users = [m for m in users if m.get("role") == "user"]
    text = " ".join(content_text(users[-1].get("content")).split()) if users else ""
    return text if len(text) <= _PREVIEW else text[: _PREVIEW - 1] + "…"


def queue_table(
    requests: Iterable[QueuedRequest], me: str | None, stats: Mapping[str, Any] | None = None
) -> Table:
    shown = sorted(requests, key=lambda r: r.number)
    table = Table(
        title=f"queue: {len(shown)} requests (type a number to claim it)",
        caption=stats_line(stats) if stats else None,
    )
    for column in ("#", "model", "client", "dialect", "state", "held by", "deadline", "asks"):
        table.add_column(column, justify="right" if column in ("#", "deadline") else "left")
    for request in shown:
        data = request.data
        holder = data.get("operator")
        table.add_row(
            str(request.number),
            Text(printable(data.get("model")), style="cyan"),
            Text(printable(data.get("client"))),
            Text(printable(data.get("dialect"))),
            Text(printable(data.get("state")), style=_state_style(data.get("state"))),
            Text("you" if holder and holder == me else printable(holder), style="bold"),
            request.seconds_left(),
            Text(preview(request), style="dim"),
        )
    return table


def stats_line(stats: Mapping[str, Any]) -> str:
    """The server's `stats`: 3 waiting, the oldest for 1:20; 2 operators online."""
    waiting, oldest = stats.get("waiting"), stats.get("oldest_wait")
    online = stats.get("operators_online")
    line = f"{printable(waiting)} waiting"
    if waiting and isinstance(oldest, int | float):
        line += f", the oldest for {int(oldest) // 60}:{int(oldest) % 60:02d}"
    people = "operator" if online == 1 else "operators"
    return f"{line}; {printable(online)} {people} online"


def _state_style(state: Any) -> str:
    return "green" if state == "queued" else "yellow"


def conversation(request: QueuedRequest) -> RenderableType:
    """The whole request: who asked what, the tools offered, the messages in order."""
    parts: list[RenderableType] = [_heading(request)]
    tools = [t for t in request.data.get("tools") or () if isinstance(t, dict)]
    if tools:
        parts.append(Text("tools offered:", style="bold"))
        parts.extend(tool_signature(tool) for tool in tools)
    for name, why in _dict(request.data.get("tool_problems")).items():
        parts.append(Text(f"  {printable(name)} cannot be called: {printable(why)}", style="red"))
    choice = request.data.get("tool_choice")
    if choice not in (None, "auto"):
        parts.append(Text(f"tool_choice: {printable(orjson.dumps(choice).decode())}"))
    parts.append(_messages(request.data.get("messages") or ()))
    return Group(*parts)


def _heading(request: QueuedRequest) -> Text:
    data = request.data
    heading = Text(f"── #{request.number} {printable(data.get('model'))}", style="bold")
    if data.get("asked") and data.get("asked") != data.get("model"):
        heading.append(f" (asked as {printable(data['asked'])})")
    heading.append(f" · from {printable(data.get('client'))} · {printable(data.get('dialect'))}")
    heading.append(" · streamed" if data.get("stream") else " · whole answer")
    if data.get("max_tokens"):
        heading.append(f" · max_tokens {printable(data['max_tokens'])}")
    return heading


def tool_signature(tool: Event) -> Text:
    """`get_weather(city: string, days?: integer)`: `?` marks what is not required."""
    function = _dict(tool.get("function"))
    schema = function.get("parameters")
    line = Text("  ")
    line.append(printable(function.get("name")), style="bold yellow")
    line.append(f"({_parameters(schema)})")
    if function.get("description"):
        line.append(f"  {printable(function['description'])}", style="dim")
    return line


def _parameters(schema: Any) -> str:
    if not isinstance(schema, dict):
        return ""
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return printable(orjson.dumps(schema).decode())
    required = _list(schema.get("required"))
    return ", ".join(
        f"{printable(name)}{'' if name in required else '?'}: {_type_name(spec)}"
        for name, spec in properties.items()
    )


def _type_name(spec: Any) -> str:
    if not isinstance(spec, dict):
        return "any"
    if isinstance(spec.get("enum"), list):
        return "|".join(printable(orjson.dumps(v).decode()) for v in spec["enum"])
    kind = spec.get("type", "any")
    if kind == "array":
        return f"{_type_name(spec.get('items'))}[]"
    return "|".join(map(printable, kind)) if isinstance(kind, list) else printable(kind)


def _messages(messages: Iterable[Any]) -> Table:
    # A grid keeps a long message's wrapped lines under its own column, not under the role.
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column()
    for message in messages:
        if isinstance(message, dict):
            grid.add_row(*message_row(message))
    return grid


def message_row(message: Event) -> tuple[Text, Text]:
    role = str(message.get("role") or "?")
    label = Text(printable(role), style=f"bold {ROLE_STYLES.get(role, 'white')}")
    if message.get("tool_call_id"):
        label.append(f" {printable(message['tool_call_id'])}", style="dim")
    body = Text(content_text(message.get("content")))
    for call in message.get("tool_calls") or ():
        if isinstance(call, dict):
            if body:
                body.append("\n")
            body.append_text(call_text(call))
    return label, body


def call_text(call: Event) -> Text:
    """A tool call, in the OpenAI shape of a message or the desk's flat one."""
    function = _dict(call.get("function")) or call
    text = Text("→ ", style="yellow")
    text.append(printable(function.get("name")), style="bold yellow")
    text.append(f" {arguments_text(function.get('arguments'))}")
    if call.get("id"):
        text.append(f"  [{printable(call['id'])}]", style="dim")
    return text


def arguments_text(arguments: Any) -> str:
    # Arguments travel as a JSON string; shown compact, or as they are when not JSON.
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return printable(arguments)
    return printable(orjson.dumps(arguments).decode())


def answer_so_far(text: str, calls: Iterable[Any]) -> Text:
    shown = Text()
    shown.append("answer so far: ", style="bold cyan")
    shown.append(printable(text) or "(no text)")
    for call in calls:
        if isinstance(call, dict):
            shown.append("\n")
            shown.append_text(call_text(call))
    return shown
