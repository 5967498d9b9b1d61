"""The log layer: renders the core's stdlib log records as coloured, plain or JSON lines.

The core only logs with `extra=` fields; this is the one place that knows how a request
line or a scan summary looks. Colour is used only on a terminal and never with NO_COLOR.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

import orjson
from rich.console import Console
from rich.text import Text

_LEVEL_STYLES = {
    logging.DEBUG: "dim",
    logging.INFO: "",
    logging.WARNING: "yellow",
    logging.ERROR: "bold red",
    logging.CRITICAL: "bold white on red",
}
# Fields every LogRecord has; anything else came in through `extra=`.
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}


def _status_style(status: int) -> str:
    if status >= 500:
        return "bold red"
    if status >= 400:
        return "yellow"
    return "green"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}ms"


def render_request(fields: dict[str, Any]) -> Text:
    text = Text()
    if fields.get("worker"):
        text.append(f"w{fields['worker']} ", style="magenta")
    text.append(f"{fields.get('method', '')} {fields.get('path', '')}", style="bold")
    if fields.get("model"):
        text.append(f" {fields['model']}", style="cyan")
        if fields.get("upstream"):
            text.append(f" → {fields['upstream']}", style="blue")
    status = int(fields.get("status", 0))
    text.append(f" {status}", style=_status_style(status))
    text.append(f" ttfb {_ms(fields.get('ttfb_ms'))} total {_ms(fields.get('duration_ms'))}")
    prompt, completion = fields.get("prompt_tokens"), fields.get("completion_tokens")
    if prompt is not None or completion is not None:
        text.append(
            f" tokens {prompt if prompt is not None else '-'}/"
            f"{completion if completion is not None else '-'}",
            style="cyan",
        )
    text.append(f" {fields.get('client') or '-'}", style="dim")
    if fields.get("key"):
        text.append(f" key {fields['key']}", style="dim")
    return text


class ConsoleHandler(logging.Handler):
    """Human-readable lines; rich decides colour from the stream (terminal, NO_COLOR)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.console = Console(file=stream, highlight=False, soft_wrap=True)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = record_fields(record)
            line = Text(time.strftime("%H:%M:%S ", time.localtime(record.created)), style="dim")
            if fields.get("event") == "request":
                line.append_text(render_request(fields))
            else:
                line.append(record.getMessage(), style=_LEVEL_STYLES.get(record.levelno, ""))
            if record.exc_info:
                line.append("\n" + logging.Formatter().formatException(record.exc_info))
            self.console.print(line)
        except Exception:
            self.handleError(record)


class JsonHandler(logging.Handler):
    """One JSON object per line, for log shippers."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = {
                "time": record.created,
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
                **record_fields(record),
            }
            if record.exc_info:
                entry["exception"] = logging.Formatter().formatException(record.exc_info)
            self.stream.write(orjson.dumps(entry, default=str).decode() + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)


def setup_logging(verbose: int = 0, log_format: str = "text", stream: TextIO | None = None) -> None:
    """verbose 0: banner, scans, warnings; 1: + one line per request; 2: + debug detail."""
    out = stream or sys.stdout
    handler: logging.Handler = JsonHandler(out) if log_format == "json" else ConsoleHandler(out)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    llproxy = logging.getLogger("llproxy")
    llproxy.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    access_level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.getLogger("llproxy.access").setLevel(access_level)
    # aiohttp logs a traceback for every request its parser rejects (an over-long header,
    # a malformed request line): client mistakes any client can repeat at will. Handler
    # errors never reach it; llproxy's own boundary logs those.
    logging.getLogger("aiohttp.server").setLevel(
        logging.DEBUG if verbose >= 2 else logging.CRITICAL
    )
