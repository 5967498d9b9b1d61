"""`llproxy capture show`: captured exchanges printed for a person, the request and the
answer side by side, a stream folded to its text and its number of events."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .tables import print_json

SHOWN_CHARS = 4000  # of one side's text; the capture file has the rest


def show_exchanges(entries: Sequence[Mapping[str, Any]], as_json: bool) -> None:
    if as_json:
        print_json([dict(entry) for entry in entries])
        return
    out = Console()
    if not entries:
        out.print("no captured exchanges")
        return
    for entry in entries:
        out.print(exchange_panel(entry))


def exchange_panel(entry: Mapping[str, Any]) -> Panel:
    request = entry.get("request") or {}
    response = entry.get("response") or {}
    timings = entry.get("timings") or {}
    status = int(entry.get("status") or 0)
    sides = Table(expand=True, show_edge=False)
    sides.add_column("request")
    sides.add_column("answer")
    sides.add_row(
        Group(
            Text(f"{request.get('method', '?')} {request.get('path', '?')}", style="bold"),
            Text(readable(request.get("body"))),
        ),
        Text(readable_answer(response.get("body"))),
    )
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(entry.get("time") or 0)))
    model = entry.get("model") or "-"
    served = entry.get("served")
    names = model if served in (None, model) else f"{model} → {served}"
    title = (
        f"{entry.get('id', '?')}  {when}  {names} @ {entry.get('upstream') or '-'}  "
        f"[{'red' if status >= 400 else 'green'}]{status}[/]"
    )
    subtitle = (
        f"{entry.get('dialect', '?')} client, {entry.get('upstream_dialect', '?')} upstream; "
        f"first byte {_ms(timings.get('first_byte_ms'))}, "
        f"last byte {_ms(timings.get('last_byte_ms'))}"
    )
    return Panel(sides, title=title, subtitle=subtitle, title_align="left")


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def readable(body: str | None) -> str:
    """A JSON body indented, anything else as it is; cut at SHOWN_CHARS."""
    if body is None:
        return "(not kept)"
    try:
        text = orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        text = body
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"


def readable_answer(body: str | None) -> str:
    """A stream (SSE or JSON lines) folded to its text and its event count; a whole
    answer indented."""
    if body is None:
        return "(not kept)"
    events = stream_events(body)
    if events is None:
        return readable(body)
    text = "".join(event_text(event) for event in events)
    return f"{text[:SHOWN_CHARS]}{'…' if len(text) > SHOWN_CHARS else ''}\n({len(events)} events)"


def stream_events(body: str) -> list[Any] | None:
    """The events of an SSE or JSON-lines stream, or None when the body is one document."""
    lines = [line for line in body.splitlines() if line.strip()]
    data = [line[5:].strip() for line in lines if line.startswith("data:")]
    if not data:  # Ollama's JSON lines: a stream only when there are several
        if len(lines) < 2:
            return None
        data = lines
    events: list[Any] = []
    for item in data:
        if item == "[DONE]":
            continue
        try:
            events.append(orjson.loads(item))
        except orjson.JSONDecodeError:
            return None
    return events


def event_text(event: Any) -> str:
    """The generated text an event carries, in any client dialect's stream."""
    if not isinstance(event, dict):
        return ""
    pieces: list[Any] = []
    for choice in event.get("choices") or ():  # OpenAI chat and completions
        if isinstance(choice, dict):
            delta = choice.get("delta")
            pieces.append(delta.get("content") if isinstance(delta, dict) else choice.get("text"))
    delta = event.get("delta")
    if isinstance(delta, dict):  # Anthropic
        pieces.append(delta.get("text"))
    elif isinstance(delta, str) and event.get("type") == "response.output_text.delta":
        pieces.append(delta)  # Responses
    message = event.get("message")
    if isinstance(message, dict):  # Ollama chat
        pieces.append(message.get("content"))
    if isinstance(event.get("response"), str):  # Ollama generate
        pieces.append(event["response"])
    for candidate in event.get("candidates") or ():  # Gemini
        content = candidate.get("content") if isinstance(candidate, dict) else None
        for part in (content or {}).get("parts") or () if isinstance(content, dict) else ():
            if isinstance(part, dict):
                pieces.append(part.get("text"))
    return "".join(piece for piece in pieces if isinstance(piece, str))


# Headers a replay does not copy: the connection's own, and the masked credentials.
_NOT_REPLAYED = frozenset({"host", "content-length", "connection", "accept-encoding"})


async def replay(
    entry: Mapping[str, Any], url: str, key: str | None, timeout: float = 600
) -> tuple[int, str]:
    """Send a captured request to llproxy again (with `key` instead of the masked one):
    its new status and answer."""
    import aiohttp

    request = entry.get("request") or {}
    body = request.get("body")
    if body is None or request.get("truncated"):
        raise ValueError("its request body was not kept whole")
    # The `?key=` was masked: the key goes in a header instead.
    path = re.sub(r"[?&]key=\*\*\*", "", str(request.get("path") or "/"))
    headers = {
        name: value
        for name, value in (request.get("headers") or {}).items()
        if name.lower() not in _NOT_REPLAYED and "***" not in value
    }
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.request(
                str(request.get("method") or "POST"),
                url.rstrip("/") + path,
                data=body.encode(),
                headers=headers,
            ) as response,
        ):
            return response.status, (await response.read()).decode("utf-8", "replace")
    except aiohttp.ClientError as exc:
        raise OSError(str(exc) or type(exc).__name__) from None


def show_replay(entry: Mapping[str, Any], status: int, answer: str) -> None:
    """The captured answer beside the new one."""
    sides = Table(expand=True, show_edge=False)
    old = int(entry.get("status") or 0)
    sides.add_column(f"captured: {old}")
    sides.add_column(f"now: {status}")
    sides.add_row(
        Text(readable_answer((entry.get("response") or {}).get("body"))),
        Text(readable_answer(answer)),
    )
    title = f"replay of {entry.get('id', '?')}: {entry.get('model') or '-'}"
    Console().print(Panel(sides, title=title, title_align="left"))
