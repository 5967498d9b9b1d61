"""The backend for OpenAI-compatible HTTP servers (llama.cpp, vLLM, Ollama, LM Studio,
tabbyAPI, SGLang, cloud APIs): found by discovery, reached over per-worker keep-alive
pools of our own HTTP/1.1 client."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ...config import Timeouts
from ...core.call import RETRY_HEADERS, Call, Reply, via_name
from ...core.deadlines import Deadline, Watchdog
from ...core.errors import ProxyError, ReplicaUnavailable, UpstreamTimeout, UpstreamUnreachable
from ...core.record import RequestRecord
from ...core.registry import Model, Replica, Upstream
from .tokens import TOKENIZE_TIMEOUT, TokenCounter
from .transport import (
    ConnectFailed,
    ResponseBounds,
    UpstreamBroken,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTooLarge,
    request_path,
)

MAX_ERROR_BODY = 64 * 1024
# keep-alive just under the 5 s idle timeout of uvicorn-based servers (vLLM, SGLang,
# tabbyAPI), so a pooled connection is never reused while the server is closing it.
UPSTREAM_KEEPALIVE = 4.0
# Upstream response headers worth relaying; everything else is hop-by-hop or describes a
# body encoding already undone.
_RELAYED = (
    ("Content-Type", "content-type"),
    ("X-Request-Id", "x-request-id"),
    ("Retry-After", "retry-after"),  # a 429's or 529's: when the client may try again
)


class OpenAIHttpBackend:
    """Sends a Call to one replica; returns once the first byte is in, so nothing has been
    written to the client when a replica cannot be reached or times out before it."""

    def __init__(
        self, timeouts: Timeouts, bounds: ResponseBounds | None = None, instance: str = ""
    ) -> None:
        self.pool = UpstreamPool(timeouts.connect, UPSTREAM_KEEPALIVE, bounds)
        self.watchdog = Watchdog()
        self.timeouts = timeouts
        # Requests carry this llproxy's name, after the proxies they passed before.
        self.via = f"1.1 {via_name(instance)}" if instance else ""
        self.tokens = TokenCounter(self.pool, self.watchdog)

    async def close(self) -> None:
        self.watchdog.close()
        await self.pool.close()

    async def send(self, call: Call, replica: Replica, record: RequestRecord) -> Reply:
        upstream = replica.upstream
        body = call.payload.encode(replica.upstream_id)
        via = f"{call.via}, {self.via}" if call.via and self.via else call.via or self.via
        try:
            with self.watchdog.deadline(self.timeouts.first_byte) as deadline:
                try:
                    response = await self.pool.post(
                        upstream,
                        request_path(call.route) + call.query,
                        body,
                        call.payload.content_type,
                        via,
                        headers=call.headers,
                    )
                except ConnectFailed as exc:
                    raise ReplicaUnavailable(f"{upstream.address} ({exc})") from None
                try:
                    return await self._reply(response, deadline, record)
                except BaseException:
                    # Cancelled, timed out or failed: drop the connection so the upstream
                    # notices and stops generating.
                    response.close()
                    raise
        except TimeoutError:
            record.upstream_error = "timeout"
            raise UpstreamTimeout(
                f"upstream {upstream.address} sent nothing for {self.timeouts.first_byte:g} s"
            ) from None
        except UpstreamBroken as exc:
            raise _failure(exc, upstream.address, record) from None

    async def _reply(
        self, response: UpstreamResponse, deadline: Deadline, record: RequestRecord
    ) -> Reply:
        headers = response.headers
        relayed = {name: headers[key] for name, key in _RELAYED if key in headers}
        if response.status >= 400:
            # When to try again, for the client to hear (a 429's, a 503's).
            relayed |= {
                name: headers[name.lower()] for name in RETRY_HEADERS if name.lower() in headers
            }
            raw = await response.read(MAX_ERROR_BODY)
            _finish(response)
            return Reply(response.status, response.content_type, raw, headers=relayed)
        if response.content_type != "text/event-stream":
            if not response.at_eof():  # usually all came at once
                deadline.extend(self.timeouts.idle)
            data = await response.read()
            record.first_byte_at = time.perf_counter()
            response.release()
            return Reply(response.status, response.content_type, data, headers=relayed)
        first = await response.chunk()
        record.first_byte_at = time.perf_counter()
        stream = HttpStream(response, self.watchdog, self.timeouts.idle, record)
        return Reply(response.status, "text/event-stream", first, stream, relayed)

    async def count_tokens(self, model: Model, chat: Mapping[str, Any]) -> int | None:
        """The tokens of a chat's prompt as the model will see it, counted by the model's
        own server (llama.cpp, vLLM); None when it cannot or does not answer in time."""
        return await self.tokens.count(model.replicas[0], chat)

    async def ask(
        self, upstream: Upstream, path: str, body: dict[str, Any], from_root: bool = False
    ) -> Any:
        """The JSON a server answers a small POST with, within TOKENIZE_TIMEOUT; None when
        it answers anything but a 200 in time (a token count is only ever an extra)."""
        try:
            with self.watchdog.deadline(TOKENIZE_TIMEOUT):
                return await self.tokens.post(upstream, path, body, from_root=from_root)
        except TimeoutError:
            return None


def _finish(response: UpstreamResponse) -> None:
    """Hand a read connection back to its pool, or drop one whose answer was cut short."""
    if response.at_eof():
        response.release()
    else:
        response.close()


def _failure(exc: UpstreamBroken, address: str, record: RequestRecord) -> ProxyError:
    if isinstance(exc, UpstreamTooLarge):
        record.upstream_error = "too_large"
        return UpstreamUnreachable(
            f"upstream {address} was cut off: {exc}", code="upstream_too_large"
        )
    record.upstream_error = "failed"
    return UpstreamUnreachable(f"upstream {address} failed: {exc}")


class HttpStream:
    """The rest of an upstream's event stream; every chunk must come within the idle
    timeout. Closed before its end, it drops the connection so the upstream stops."""

    def __init__(
        self, response: UpstreamResponse, watchdog: Watchdog, idle: float, record: RequestRecord
    ) -> None:
        self.response = response
        self.idle = idle
        self.record = record
        # One deadline for the whole stream, moved before each wait: one made for each
        # chunk cost ~1.3k instructions a chunk at a model's pace (instructions.py --paced).
        self.deadline = watchdog.deadline(idle)
        self.ended = response.at_eof()
        if self.ended:
            response.release()

    async def next(self) -> bytes:
        if self.ended:
            return b""
        deadline = self.deadline
        deadline.extend(self.idle)
        try:
            with deadline:
                chunk = await self.response.chunk()
        except TimeoutError:
            self.record.upstream_error = "timeout"
            raise UpstreamTimeout(
                f"upstream {self.record.upstream} sent nothing for {self.idle:g} s"
            ) from None
        except UpstreamBroken as exc:
            raise _failure(exc, self.record.upstream or "-", self.record) from None
        if not chunk or self.response.at_eof():
            self.ended = True
            self.response.release()
        return chunk

    def close(self) -> None:
        if not self.ended:
            self.ended = True
            self.response.close()
