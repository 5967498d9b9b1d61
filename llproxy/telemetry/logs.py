"""The log layer: renders the core's stdlib log records as coloured, plain or JSON lines.

The core only logs with `extra=` fields; this is the one place that knows how a request
line or a scan summary looks. Colour is used only on a terminal and never with NO_COLOR.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Sequence
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


# Credentials as they show in headers, URLs and error messages; and llproxy's own keys.
_CREDENTIALS = re.compile(
    r"(?i)(?P<bearer>\bbearer\s+)[^\s'\",;\\]+"
    r"|(?P<field>\b(?:proxy-)?(?:authorization|x-api-key|api[-_]?key|admin[-_]key)['\"]?"
    r"\s*[:=]\s*['\"]?)(?!bearer\b)[^\s'\",;\\]+"
    r"|\bllp-[A-Za-z0-9_-]{8,}"
)


class Redactor:
    """Masks credentials in any text bound for the log: the shapes above, and the secrets
    this configuration holds (static keys, the admin key, upstream apikeys)."""

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = _CREDENTIALS.sub(
            lambda match: (match.group("bearer") or match.group("field") or "") + "***", text
        )
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


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


def _exception_text(record: logging.LogRecord) -> str | None:
    if not record.exc_info:
        return None
    return logging.Formatter().formatException(record.exc_info)


class ConsoleHandler(logging.Handler):
    """Human-readable lines; rich decides colour from the stream (terminal, NO_COLOR)."""

    def __init__(self, stream: TextIO, redact: Redactor) -> None:
        super().__init__()
        self.console = Console(file=stream, highlight=False, soft_wrap=True)
        self.redact = redact

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = record_fields(record)
            line = Text(time.strftime("%H:%M:%S ", time.localtime(record.created)), style="dim")
            if fields.get("event") == "request":  # built from fields that hold no secret
                line.append_text(render_request(fields))
            else:
                line.append(
                    self.redact(record.getMessage()), style=_LEVEL_STYLES.get(record.levelno, "")
                )
            if (exception := _exception_text(record)) is not None:
                line.append("\n" + self.redact(exception))
            self.console.print(line)
        except Exception:
            self.handleError(record)


class JsonHandler(logging.Handler):
    """One JSON object per line, for log shippers."""

    def __init__(self, stream: TextIO, redact: Redactor) -> None:
        super().__init__()
        self.stream = stream
        self.redact = redact

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = record_fields(record)
            message = record.getMessage()
            if fields.get("event") != "request":  # those are built from safe fields
                message = self.redact(message)
                fields = {k: self.redact(v) if isinstance(v, str) else v for k, v in fields.items()}
            entry = {
                "time": record.created,
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": message,
                **fields,
            }
            if (exception := _exception_text(record)) is not None:
                entry["exception"] = self.redact(exception)
            self.stream.write(orjson.dumps(entry, default=str).decode() + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)


def setup_logging(
    verbose: int = 0,
    log_format: str = "text",
    stream: TextIO | None = None,
    secrets: Sequence[str] = (),
) -> None:
    """verbose 0: banner, scans, warnings; 1: + one line per request; 2: + debug detail.
    `secrets` are masked wherever they would appear."""
    out = stream or sys.stdout
    redact = Redactor(secrets)
    handler: logging.Handler = (
        JsonHandler(out, redact) if log_format == "json" else ConsoleHandler(out, redact)
    )
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
