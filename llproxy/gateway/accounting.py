"""Accounting of one request once the client has its answer: the metrics, the usage
record of a request that reached a model, and the access log line."""

from __future__ import annotations

import logging
import re
import time

from aiohttp import web

from ..core.record import RequestRecord
from ..core.usage import UsageRecord
from ..stores import UsageSink
from ..telemetry.capture import CaptureWriter, Exchange
from ..telemetry.metrics import Telemetry

access_log = logging.getLogger("llproxy.access")

BODY_LOG_LIMIT = 2000
_SECRET_HEADERS = {
    "authorization",
    "x-api-key",
    "x-goog-api-key",
    "apikey",
    "api-key",
    "proxy-authorization",
}
_SECRET_FIELDS = re.compile(
    rb'("(?:api_?key|authorization|x-api-key|password|secret)"\s*:\s*)"(?:[^"\\]|\\.)*"',
    re.IGNORECASE,
)


class Accounting:
    def __init__(
        self,
        telemetry: Telemetry,
        usage: UsageSink,
        worker_id: int,
        capture: CaptureWriter | None = None,
    ) -> None:
        self.telemetry = telemetry
        self.usage = usage
        self.worker_id = worker_id
        self.capture = capture  # None: the wire capture is off

    def resolved(self, record: RequestRecord, model: str) -> None:
        """The request is for this registry model: under way until `account` (or until a
        fallback chain moves it to another)."""
        in_flight = self.telemetry.in_flight
        if record.served is not None:
            in_flight[record.served] -= 1
        record.served = model
        in_flight[model] = in_flight.get(model, 0) + 1

    def account(
        self, request: web.Request, record: RequestRecord, status: int, started: float
    ) -> None:
        duration = time.perf_counter() - started
        if record.read_usage is not None:
            record.take_usage(record.read_usage())
        # Only registry names become label values: a client must not mint time series.
        label = record.served or "-"
        telemetry = self.telemetry
        first_byte = None if record.first_byte_at is None else record.first_byte_at - started
        if record.served is not None:
            telemetry.in_flight[label] -= 1
            telemetry.record_answer(
                label,
                status,
                record.dialect,
                duration,
                first_byte,
                record.prompt_tokens,
                record.completion_tokens,
            )
            self.usage.add(
                (
                    UsageRecord(
                        time.time(),
                        record.client,
                        label,
                        record.upstream,
                        status,
                        record.prompt_tokens,
                        record.completion_tokens,
                        round(duration * 1000, 3),
                        record.dialect,
                    ),
                )
            )
        else:
            telemetry.count_request(label, status, record.dialect)
        if record.upstream_error is not None:
            key = (record.upstream or "-", record.upstream_error)
            telemetry.upstream_errors[key] = telemetry.upstream_errors.get(key, 0) + 1
        if record.dropped_chunks:
            key = (record.upstream or "-", "dropped_chunk")
            errors = telemetry.upstream_errors
            errors[key] = errors.get(key, 0) + record.dropped_chunks
        if record.stage is not None:
            telemetry.stages[record.stage] = telemetry.stages.get(record.stage, 0) + 1
        telemetry.redactions += record.redacted
        if access_log.isEnabledFor(logging.INFO):
            self._log(request, record, status, duration, first_byte)
        if self.capture is not None:
            self._capture(self.capture, request, record, status, duration, first_byte)

    def _capture(
        self,
        capture: CaptureWriter,
        request: web.Request,
        record: RequestRecord,
        status: int,
        duration: float,
        first_byte: float | None,
    ) -> None:
        """The exchange handed to the capture's thread, unformatted: formatting, redaction
        and the disk are the thread's, off this loop."""
        key = None if record.key is None else record.key.name
        if not capture.wants(status, record.model, record.served, key):
            return
        exchange = Exchange(
            time.time() - duration,
            first_byte,
            duration,
            request.method,
            request.path_qs,
            tuple(request.headers.items()),
            record.request_body,
            status,
            record.response_body
            if record.response_chunks is None
            else b"".join(record.response_chunks),
            record.dialect,
            record.answered_in,
            record.model,
            record.served,
            record.upstream,
            key,
            record.upstream_error,
            record.upstream_request,
            None if record.upstream_chunks is None else b"".join(record.upstream_chunks),
        )
        if capture.offer(exchange):
            self.telemetry.captured += 1
        else:
            self.telemetry.capture_dropped += 1

    def _log(
        self,
        request: web.Request,
        record: RequestRecord,
        status: int,
        duration: float,
        first_byte: float | None,
    ) -> None:
        if access_log.isEnabledFor(logging.DEBUG):
            _log_bodies(request, record)
        access_log.info(
            "%s %s %s",
            request.method,
            request.path,
            status,
            extra={
                "event": "request",
                "worker": self.worker_id,
                "client": request.remote,
                "key": None
                if record.key is None
                else f"{record.key.name}({record.key.fingerprint})",
                "method": request.method,
                "path": request.path,
                "dialect": record.dialect,
                "model": record.model,
                "served": record.served,  # the registry model that answered (a chain's)
                "upstream": record.upstream,
                "status": status,
                "ttfb_ms": None if first_byte is None else round(first_byte * 1000, 1),
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
                "duration_ms": round(duration * 1000, 1),
                "stage": record.stage,
                "redacted": record.redacted,  # how many secrets, never which
            },
        )


def redact(body: bytes) -> str:
    """A body for the debug log: secret-looking JSON fields masked, then truncated."""
    masked = _SECRET_FIELDS.sub(rb'\1"***"', body)
    text = masked[:BODY_LOG_LIMIT].decode("utf-8", "replace")
    return text + (f"… ({len(body)} bytes)" if len(masked) > BODY_LOG_LIMIT else "")


def _log_bodies(request: web.Request, record: RequestRecord) -> None:
    headers = {
        name: "***" if name.lower() in _SECRET_HEADERS else value
        for name, value in request.headers.items()
    }
    access_log.debug(
        "request %s %s headers %s body %s",
        request.method,
        request.path,
        headers,
        redact(record.request_body or b""),
        extra={"event": "request_body"},
    )
    if record.response_body is not None:
        access_log.debug(
            "response body %s", redact(record.response_body), extra={"event": "response_body"}
        )
