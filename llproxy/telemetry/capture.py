"""The wire capture: each exchange a worker answered as one JSON line, its secrets masked,
written by a thread of its own from a bounded queue (a full queue drops the exchange and
counts it: a request never waits on the disk), into `capture-<worker>.jsonl` in the
capture directory, rotated by size and kept to a bounded number of files."""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import orjson

from ..config import Capture
from .logs import Redactor

log = logging.getLogger("llproxy.capture")

QUEUE_SIZE = 1024  # exchanges waiting for the thread; beyond, they are dropped
BODY_LIMIT = 1024 * 1024  # of each body kept in a line; the rest is cut, its size said
SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "x-goog-api-key",
        "api-key",
        "apikey",
        "cookie",
        "set-cookie",
    }
)
# Secret-looking JSON fields in a body, as the -vv log masks them.
_SECRET_FIELDS = re.compile(
    r'("(?:api_?key|authorization|x-api-key|password|secret)"\s*:\s*)"(?:[^"\\]|\\.)*"',
    re.IGNORECASE,
)
_STOP = object()


@dataclass(slots=True)
class Exchange:
    """What the accounting hands over, unformatted: the thread turns it into a line."""

    received: float  # wall-clock seconds when the request came in
    first_byte: float | None  # seconds after `received` the upstream's first byte came
    last_byte: float  # seconds after `received` the client had the answer's last byte
    method: str
    path: str  # with its query string
    request_headers: Sequence[tuple[str, str]]
    request_body: bytes | None
    status: int
    response_body: bytes | None
    dialect: str
    answered_in: str  # the upstream's dialect when it differs (a translated exchange)
    model: str | None  # as the client named it
    served: str | None  # the registry model
    upstream: str | None
    key: str | None  # the client key's name
    upstream_error: str | None
    # The internal OpenAI-shaped request routed (what an OpenAI-dialect replica gets) and
    # the upstream's answer before the client's dialect made it its own.
    upstream_request: bytes | None = None
    upstream_response: bytes | None = None


class CaptureWriter:
    """One worker's capture: `wants` and `offer` run on the event loop and only check and
    enqueue; the thread formats, redacts and writes."""

    def __init__(
        self, settings: Capture, worker_id: int, secrets: Sequence[str], size: int = QUEUE_SIZE
    ) -> None:
        self.settings = settings
        self.path = Path(settings.dir) / f"capture-{worker_id}.jsonl"
        self.worker_id = worker_id
        self.redact = Redactor(secrets)
        self._queue: queue.Queue[Exchange | object] = queue.Queue(size)
        self._thread = threading.Thread(target=self._run, name="llproxy-capture", daemon=True)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def wants(self, status: int, model: str | None, served: str | None, key: str | None) -> bool:
        settings = self.settings
        if settings.failed_only and status < 400:
            return False
        if settings.keys and key not in settings.keys:
            return False
        if settings.models:
            names = [name for name in (model, served) if name is not None]
            return any(fnmatchcase(n, glob) for n in names for glob in settings.models)
        return True

    def offer(self, exchange: Exchange) -> bool:
        """Enqueue; False (dropped) when the queue is full: never wait."""
        try:
            self._queue.put_nowait(exchange)
        except queue.Full:
            return False
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (within `timeout`), then stop the thread."""
        if not self._started:
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        failed = False
        stream = None
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                assert isinstance(item, Exchange)
                try:
                    if stream is None:
                        self.path.parent.mkdir(parents=True, exist_ok=True)
                        stream = self.path.open("ab")
                    line = self.line(item)
                    if stream.tell() and stream.tell() + len(line) > self.settings.max_bytes:
                        stream.close()
                        stream = None
                        self._rotate()
                        stream = self.path.open("ab")
                    stream.write(line)
                    stream.flush()
                    failed = False
                except Exception:
                    if not failed:  # once per run of failures, not once per exchange
                        log.warning("capture: cannot write %s", self.path, exc_info=True)
                    failed = True
        finally:
            if stream is not None:
                stream.close()

    def _rotate(self) -> None:
        """capture-N.jsonl → .1 → .2 …; what would go beyond `files` is overwritten."""
        base = self.path
        if self.settings.files == 1:
            base.unlink(missing_ok=True)
            return
        for index in range(self.settings.files - 1, 0, -1):
            older = base.with_name(f"{base.name}.{index - 1}") if index > 1 else base
            if older.exists():
                os.replace(older, base.with_name(f"{base.name}.{index}"))

    def line(self, exchange: Exchange) -> bytes:
        redact = self.redact
        entry: dict[str, Any] = {
            "id": f"{self.worker_id}-{exchange.received:.6f}",
            "time": exchange.received,
            "worker": self.worker_id,
            "model": exchange.model,
            "served": exchange.served,
            "upstream": exchange.upstream,
            "dialect": exchange.dialect,
            "upstream_dialect": exchange.answered_in,
            "key": exchange.key,
            "status": exchange.status,
            "upstream_error": exchange.upstream_error,
            "timings": {
                "received": exchange.received,
                "first_byte_ms": None
                if exchange.first_byte is None
                else round(exchange.first_byte * 1000, 3),
                "last_byte_ms": round(exchange.last_byte * 1000, 3),
            },
            "request": {
                "method": exchange.method,
                "path": redact(exchange.path),
                "headers": headers(exchange.request_headers, redact),
                **body(exchange.request_body, redact),
            },
            "response": body(exchange.response_body, redact),
        }
        # The upstream side only where it differs: a translated dialect, a rewritten model.
        if exchange.upstream_request is not None and not same_json(
            exchange.upstream_request, exchange.request_body
        ):
            entry["upstream_request"] = body(exchange.upstream_request, redact)
        if (
            exchange.upstream_response is not None
            and exchange.upstream_response != exchange.response_body
        ):
            entry["upstream_response"] = body(exchange.upstream_response, redact)
        return orjson.dumps(entry) + b"\n"


def same_json(one: bytes, other: bytes | None) -> bool:
    try:
        return other is not None and orjson.loads(one) == orjson.loads(other)
    except orjson.JSONDecodeError:
        return one == other


def headers(items: Sequence[tuple[str, str]], redact: Redactor) -> dict[str, str]:
    # str(): aiohttp's header names are a str subclass, which orjson refuses as a key.
    return {
        str(name): "***" if name.lower() in SECRET_HEADERS else redact(value)
        for name, value in items
    }


def body(data: bytes | None, redact: Redactor) -> dict[str, Any]:
    """A body as text, its secrets masked, cut at BODY_LIMIT."""
    if data is None:
        return {"body": None}
    text = data[:BODY_LIMIT].decode("utf-8", "replace")
    text = redact(_SECRET_FIELDS.sub(r'\1"***"', text))
    return {"body": text, "bytes": len(data), "truncated": len(data) > BODY_LIMIT}


def capture_files(directory: Path) -> list[Path]:
    """Every capture file, oldest first (a rotated file by its number, highest first)."""

    def order(path: Path) -> tuple[float, int]:
        suffix = path.name.rsplit(".", 1)[-1]
        return (path.stat().st_mtime, -int(suffix) if suffix.isdigit() else 0)

    return sorted(directory.glob("capture-*.jsonl*"), key=order)


def read_exchanges(directory: Path) -> Iterator[Mapping[str, Any]]:
    """The captured exchanges in every file, oldest first; a torn line is skipped."""
    entries: list[Mapping[str, Any]] = []
    for path in capture_files(directory):
        with path.open("rb") as stream:
            for line in stream:
                try:
                    entry = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(entry, dict):
                    entries.append(entry)
    entries.sort(key=lambda entry: entry.get("time") or 0)
    return iter(entries)


def select_exchanges(
    directory: Path, last: int, model: str | None = None, failed: bool = False
) -> list[Mapping[str, Any]]:
    """The last `last` exchanges of those asked for (`model` a glob of the name asked for
    or served; `failed` only statuses >= 400), oldest first."""
    chosen = [
        entry
        for entry in read_exchanges(directory)
        if (not failed or int(entry.get("status") or 0) >= 400)
        and (
            model is None
            or any(
                isinstance(name, str) and fnmatchcase(name, model)
                for name in (entry.get("model"), entry.get("served"))
            )
        )
    ]
    return chosen[-last:]
