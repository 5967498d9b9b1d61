"""How log lines look: coloured on a terminal, plain when piped or with NO_COLOR, or JSON;
a request line and a scan summary each have their shape here."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from ..telemetry.logs import JsonHandler, Redactor, exception_text, record_fields, set_levels

# rich is imported with the first line written, not when logging is set up: a worker at
# the default verbosity writes no line for a request, and rich would cost it 1.5 MB.
if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

_LEVEL_STYLES = {
    logging.DEBUG: "dim",
    logging.INFO: "",
    logging.WARNING: "yellow",
    logging.ERROR: "bold red",
    logging.CRITICAL: "bold white on red",
}


def _status_style(status: int) -> str:
    if status >= 500:
        return "bold red"
    if status >= 400:
        return "yellow"
    return "green"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}ms"


def render_request(fields: dict[str, Any]) -> Text:
    from rich.text import Text

    text = Text()
    if fields.get("worker"):
        text.append(f"w{fields['worker']} ", style="magenta")
    text.append(f"{fields.get('method', '')} {fields.get('path', '')}", style="bold")
    if fields.get("model"):
        text.append(f" {fields['model']}", style="cyan")
        if fields.get("served") and fields["served"] != fields["model"]:
            text.append(f" = {fields['served']}", style="cyan")
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

    def __init__(self, stream: TextIO, redact: Redactor) -> None:
        super().__init__()
        self.stream = stream
        self.redact = redact
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.stream, highlight=False, soft_wrap=True)
        return self._console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from rich.text import Text  # in the try: a handler never raises into its caller

            fields = record_fields(record)
            line = Text(time.strftime("%H:%M:%S ", time.localtime(record.created)), style="dim")
            if fields.get("event") == "request":  # built from fields that hold no secret
                line.append_text(render_request(fields))
            else:
                line.append(
                    self.redact(record.getMessage()), style=_LEVEL_STYLES.get(record.levelno, "")
                )
            if (exception := exception_text(record)) is not None:
                line.append("\n" + self.redact(exception))
            self.console.print(line)
        except Exception:
            self.handleError(record)


def setup_logging(
    verbose: int = 0,
    log_format: str = "text",
    stream: TextIO | None = None,
    secrets: Sequence[str] = (),
) -> None:
    """Log to `stream` (stdout) as text or JSON; verbose 0: banner, scans, warnings;
    1: + one line per request; 2: + debug detail. `secrets` are masked wherever they
    would appear."""
    out = stream or sys.stdout
    redact = Redactor(secrets)
    handler: logging.Handler = (
        JsonHandler(out, redact) if log_format == "json" else ConsoleHandler(out, redact)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_levels(verbose)
