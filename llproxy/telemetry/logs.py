"""Log records for machines: the credentials masked in any text bound for a log, the
fields a record carries, JSON lines for log shippers, and who logs at which verbosity.

The core only logs with `extra=` fields; how a line looks on a terminal is the ui's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

# Fields every LogRecord has; anything else came in through `extra=`.
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


# Credentials as they show in headers, URLs and error messages; and llproxy's own keys.
_CREDENTIALS = re.compile(
    r"(?i)(?P<bearer>\bbearer\s+)[^\s'\",;\\]+"
    r"|(?P<field>\b(?:proxy-)?(?:authorization|x-api-key|api[-_]?key|admin[-_]key)['\"]?"
    r"\s*[:=]\s*['\"]?)(?!bearer\b)[^\s'\",;\\]+"
    r"|\bllp-[A-Za-z0-9_-]{8,}"
    r"|(?P<query>[?&]key=)[^\s&'\"]+"  # Gemini's key in a query string
)


class Redactor:
    """Masks credentials in any text bound for the log: the shapes above, and the secrets
    this configuration holds (static keys, the admin key, upstream apikeys)."""

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = _CREDENTIALS.sub(
            lambda match: (
                (match.group("bearer") or match.group("field") or match.group("query") or "")
                + "***"
            ),
            text,
        )
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}


def exception_text(record: logging.LogRecord) -> str | None:
    if not record.exc_info:
        return None
    return logging.Formatter().formatException(record.exc_info)


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
            if (exception := exception_text(record)) is not None:
                entry["exception"] = self.redact(exception)
            self.stream.write(orjson.dumps(entry, default=str).decode() + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)


def set_levels(verbose: int) -> None:
    """verbose 0: banner, scans, warnings; 1: + one line per request; 2: + debug detail."""
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    logging.getLogger("llproxy").setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    access_level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.getLogger("llproxy.access").setLevel(access_level)
    # aiohttp logs a traceback for every request its parser rejects (an over-long header,
    # a malformed request line): client mistakes any client can repeat at will. Handler
    # errors never reach it; llproxy's own boundary logs those.
    logging.getLogger("aiohttp.server").setLevel(
        logging.DEBUG if verbose >= 2 else logging.CRITICAL
    )
