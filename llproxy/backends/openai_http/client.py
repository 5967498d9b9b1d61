"""Forwarding one client request to one upstream replica and relaying the answer.

Invariants: nothing is written to the client before the upstream's first byte arrived, so
a refused connection can still fall over to the next replica and a timeout can still be a
clean 504; event streams are relayed chunk by chunk as they arrive; and leaving this
module any way but the normal end (client gone, handler cancelled, error) closes the
upstream connection at once, so the server stops generating.
"""

from __future__ import annotations

import functools
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from ...config import Timeouts
from ...core.deadlines import Watchdog
from ...core.errors import ProxyError, UpstreamTimeout, UpstreamUnreachable, error_body
from ...core.keys import ApiKey
from ...core.payload import Payload
from ...core.registry import Balancer, Model, Replica
from .transport import (
    ConnectFailed,
    ResponseBounds,
    UpstreamBroken,
    UpstreamPool,
    UpstreamTooLarge,
)

# Upstream response headers worth relaying; everything else is hop-by-hop or describes a
# body encoding already undone.
_RELAYED = (("Content-Type", "content-type"), ("X-Request-Id", "x-request-id"))
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_ERROR_BODY = 64 * 1024
# The last reads of a stream are kept to find its usage chunk, which may arrive split.
_USAGE_TAIL_READS = 4
# keep-alive just under the 5 s idle timeout of uvicorn-based servers (vLLM, SGLang,
# tabbyAPI), so a pooled connection is never reused while the server is closing it.
UPSTREAM_KEEPALIVE = 4.0


@dataclass(slots=True)
class Exchange:
    """What happened to one proxied request, for logs, metrics and stats."""

    model: str | None = None
    resolved: bool = False  # model names a registry entry
    key: ApiKey | None = None  # the client's key, when keys are in use
    client: str = "-"  # the key's name, else the client's address
    # What the gateway puts on every answer (security, CORS, rate-limit headers). It sends
    # most answers itself; a stream, sent from here, is built with them.
    response_headers: Mapping[str, str] = field(default_factory=dict)
    # llproxy asked the upstream for the usage chunk; the client did not, so it is removed.
    hide_usage_chunk: bool = False
    # The worker is retiring: the answer ends the connection (`Connection: close`).
    close_connection: bool = False
    upstream: str | None = None
    first_byte_at: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    upstream_error: str | None = None
    # The document that carries the answer's usage, read from what the answer kept for it
    # at accounting time: after the client has its bytes, so parsing a long completion
    # does not delay them. It holds no reference back to the exchange: no cycle to collect.
    read_usage: Callable[[], Any] | None = None
    # Kept only when bodies are logged (-vv).
    request_body: bytes | None = None
    response_body: bytes | None = None

    def take_usage(self, document: Any) -> bool:
        """Record `usage` from a decoded response or chunk; False when it has none."""
        if not _has_usage(document):
            return False
        usage = document["usage"]
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        self.prompt_tokens = prompt if isinstance(prompt, int) else None
        self.completion_tokens = completion if isinstance(completion, int) else None
        return True


_EVENT_END = re.compile(rb"\r?\n\r?\n")


def _json_document(raw: bytes) -> Any:
    """The decoded JSON; None when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


_USAGE_MEMBER = b'"usage":'


def _json_usage_document(raw: bytes) -> Any:
    """A document with the answer's `usage`, parsing as little of the answer as it can.

    Usage is usually the answer's last member: then only it is parsed, not a long
    completion. The slice from the last `"usage":` to the last `}` parses as an object
    only when that member is the top level's last (a nested one leaves closing brackets
    in the slice, one inside a string is escaped); anything else parses the whole answer.
    """
    at = raw.rfind(_USAGE_MEMBER)
    end = raw.rfind(b"}")
    if 0 < at < end and raw[at - 1] != ord("\\"):
        try:
            usage = orjson.loads(raw[at + len(_USAGE_MEMBER) : end])
        except orjson.JSONDecodeError:
            usage = None
        if isinstance(usage, dict):
            return {"usage": usage}
    return _json_document(raw)


def _event_document(event: bytes) -> Any:
    """The JSON of one server-sent event's `data:` lines; None when it is not JSON."""
    return _json_document(
        b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))
    )


def _has_usage(document: Any) -> bool:
    return isinstance(document, dict) and isinstance(document.get("usage"), dict)


class _EventStream(web.StreamResponse):
    """A streamed response whose headers leave with its first chunk, in one send.

    It is prepared only once the upstream's first chunk is here, so nothing waits on the
    headers; sent apart they cost a second send and a wake-up of the client (~0.4 ms to
    the first token, measured). aiohttp's plain Response buffers its headers the same way.
    """

    _send_headers_immediately = False


class UsageFromTail:
    """Relays a stream unchanged and keeps its last reads, where a usage chunk would be."""

    def __init__(self) -> None:
        self.recent: deque[bytes] = deque(maxlen=_USAGE_TAIL_READS)

    def feed(self, chunk: bytes) -> bytes:
        self.recent.append(chunk)
        return chunk

    def finish(self) -> bytes:
        return b""

    def usage_document(self) -> Any:
        return _last_usage_event(self.recent)


def _last_usage_event(reads: Iterable[bytes]) -> Any:
    """The usage chunk among a stream's last reads: the last event that carries `usage`;
    None when none does."""
    for event in reversed(_EVENT_END.split(b"".join(reads))):
        if b'"usage"' in event and _has_usage(document := _event_document(event)):
            return document
    return None


@functools.lru_cache(maxsize=256)
def model_rename(upstream_id: str, name: str) -> ModelRename | None:
    """How the client's name replaces the upstream's id in answers; None when they agree."""
    return None if upstream_id == name else ModelRename(upstream_id, name)


class ModelRename:
    """Puts the name the client asked for where the upstream wrote its own model id.

    A structural `"model":"<id>"` cannot occur inside a JSON string (its quotes would be
    escaped there), so replacing the bytes renames exactly the member.
    """

    def __init__(self, upstream_id: str, name: str) -> None:
        old, new = orjson.dumps(upstream_id), orjson.dumps(name)
        self.pairs = tuple(
            (b'"model":' + gap + old, b'"model":' + gap + new) for gap in (b"", b" ")
        )

    def apply(self, data: bytes) -> bytes:
        for old, new in self.pairs:
            data = data.replace(old, new)
        return data


def _only_usage(document: dict[str, Any]) -> bool:
    """Whether a chunk brings the client nothing but usage: no choice carries content,
    a tool call, a finish reason or anything else. Servers shape this chunk differently
    (`choices: []`, or LiteLLM's one choice with an empty delta)."""
    for choice in document.get("choices") or ():
        if not isinstance(choice, dict):
            return False
        for key, value in choice.items():
            if key == "delta" and isinstance(value, dict):
                if any(v not in (None, "", [], {}) for v in value.values()):
                    return False
            elif key != "index" and value not in (None, "", [], {}):
                return False
    return True


class EventRelay:
    """Relays server-sent events whole: renamed to the client's model name, and minus the
    usage-only chunk (whose numbers it keeps) when the client did not ask for it.

    Complete events go on at once; only a trailing partial event waits for its end, which
    the client could not use before anyway. The upstream client bounds an event's size.
    """

    def __init__(self, exchange: Exchange, rename: ModelRename | None) -> None:
        self.exchange = exchange
        self.rename = rename
        self.hide_usage = exchange.hide_usage_chunk
        self.pending: list[bytes] = []  # a partial event, as it arrived
        self.tail = b""  # the last bytes of pending, where an event end may begin
        self.recent: deque[bytes] = deque(maxlen=_USAGE_TAIL_READS)

    def feed(self, chunk: bytes) -> bytes:
        if self.pending:
            seam = self.tail + chunk[:3]
            self.pending.append(chunk)
            if b"\n\n" not in chunk and b"\n\r\n" not in chunk and not _EVENT_END.search(seam):
                self.tail = (self.tail + chunk)[-3:]
                return b""  # still inside one event: joined once it ends
            data = b"".join(self.pending)
        else:
            data = chunk
        ends = list(_EVENT_END.finditer(data))
        if not ends:
            self.pending, self.tail = [data], data[-3:]
            return b""
        cut = ends[-1].end()
        complete = data[:cut]
        self.pending = [data[cut:]] if cut < len(data) else []
        self.tail = data[-3:]
        if self.hide_usage and b'"usage"' in complete:
            complete = self._without_usage_chunk(complete, ends)
        else:
            self.recent.append(complete)
        return self.rename.apply(complete) if self.rename is not None else complete

    def _without_usage_chunk(self, complete: bytes, ends: list[re.Match[bytes]]) -> bytes:
        kept, start = [], 0
        for end in ends:
            event = complete[start : end.end()]
            start = end.end()
            if b'"usage"' in event:
                document = _event_document(event)
                if self.exchange.take_usage(document) and _only_usage(document):
                    continue
            kept.append(event)
        return b"".join(kept)

    def finish(self) -> bytes:
        rest = b"".join(self.pending)
        self.pending = []
        return self.rename.apply(rest) if self.rename is not None else rest

    def usage_document(self) -> Any:
        """The usage chunk, when the client sees it (else `feed` took its numbers)."""
        return _last_usage_event(self.recent)


def _upstream_error(status: int, raw: bytes) -> web.Response:
    """Relay an upstream error as is when it is OpenAI-shaped, else wrap it so it is."""
    parsed = _json_document(raw)
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        body = raw
    else:
        message: Any = parsed.get("message") if isinstance(parsed, dict) else None
        if not isinstance(message, str):
            message = raw[:1000].decode("utf-8", "replace").strip() or f"upstream status {status}"
        body = error_body(message, "upstream_error", None, status)
    return web.Response(status=status, body=body, content_type="application/json")


def _stream_error_event(exc: ProxyError) -> bytes:
    return b"data: " + exc.body() + b"\n\n"


class UpstreamClient:
    """The worker's one connection pool to every upstream, and replica balancing."""

    def __init__(self, timeouts: Timeouts, bounds: ResponseBounds | None = None) -> None:
        self.pool = UpstreamPool(timeouts.connect, UPSTREAM_KEEPALIVE, bounds)
        self.watchdog = Watchdog()
        self.timeouts = timeouts
        self.balancer = Balancer()

    async def close(self) -> None:
        self.watchdog.close()
        await self.pool.close()

    async def forward(
        self,
        request: web.Request,
        model: Model,
        path: str,
        payload: Payload,
        exchange: Exchange,
    ) -> web.StreamResponse:
        refused: list[str] = []
        for replica in self.balancer.order(model.replicas):
            exchange.upstream = replica.upstream.address
            body = payload.encode(replica.upstream_id)
            rename = model_rename(replica.upstream_id, exchange.model or model.name)
            self.balancer.acquire(replica)
            try:
                return await self._attempt(
                    request, replica, path, body, payload.content_type, exchange, rename
                )
            except ConnectFailed as exc:
                exchange.upstream_error = "refused"
                refused.append(f"{replica.upstream.address} ({exc})")
            finally:
                self.balancer.release(replica)
        raise UpstreamUnreachable(
            f"no upstream for model '{model.name}' could be reached: {'; '.join(refused)}"
        )

    async def _attempt(
        self,
        request: web.Request,
        replica: Replica,
        path: str,
        body: bytes,
        media_type: bytes,
        exchange: Exchange,
        rename: ModelRename | None,
    ) -> web.StreamResponse:
        upstream = replica.upstream
        response: web.StreamResponse | None = None
        last = b""  # what the stream's end carries
        try:
            with self.watchdog.deadline(self.timeouts.first_byte) as deadline:
                upstream_resp = await self.pool.post(upstream, path, body, media_type)
                finished = False
                try:
                    if upstream_resp.status >= 400:
                        raw = await upstream_resp.read(MAX_ERROR_BODY)
                        finished = upstream_resp.at_eof()
                        return _upstream_error(upstream_resp.status, raw)
                    headers = upstream_resp.headers
                    relayed = {}
                    for name, key in _RELAYED:
                        if key in headers:
                            relayed[name] = headers[key]
                    content_type = upstream_resp.content_type
                    if content_type != "text/event-stream":
                        if not upstream_resp.at_eof():  # usually all came at once
                            deadline.extend(self.timeouts.idle)
                        data = await upstream_resp.read()
                        exchange.first_byte_at = time.perf_counter()
                        finished = True
                        if content_type == "application/json":
                            if rename is not None:
                                data = rename.apply(data)
                            exchange.read_usage = partial(_json_usage_document, data)
                        return web.Response(status=upstream_resp.status, body=data, headers=relayed)

                    # Built while the upstream thinks; sent only with the first chunk.
                    stream = _EventStream(
                        status=upstream_resp.status,
                        headers={**relayed, **_SSE_HEADERS, **exchange.response_headers},
                    )
                    events: EventRelay | UsageFromTail
                    if exchange.hide_usage_chunk or rename is not None:
                        events = EventRelay(exchange, rename)
                    else:
                        events = UsageFromTail()
                    if not exchange.hide_usage_chunk:
                        exchange.read_usage = events.usage_document
                    chunk = await upstream_resp.chunk()
                    exchange.first_byte_at = time.perf_counter()
                    response = stream
                    if exchange.close_connection:
                        response.force_close()
                    await response.prepare(request)
                    while chunk:
                        relay = events.feed(chunk)
                        if upstream_resp.at_eof():
                            # The upstream's end came with this chunk: both leave with the
                            # stream's end, in one send.
                            last = relay
                            break
                        if relay:
                            await response.write(relay)
                        deadline.extend(self.timeouts.idle)
                        chunk = await upstream_resp.chunk()
                    last += events.finish()
                    finished = True
                finally:
                    if finished:
                        upstream_resp.release()
                    else:
                        # Client gone, cancelled or failed: drop the connection so the
                        # upstream notices and stops generating.
                        upstream_resp.close()
        except TimeoutError:
            exchange.upstream_error = "timeout"
            return await self._fail(
                response,
                UpstreamTimeout(
                    f"upstream {upstream.address} sent nothing for "
                    f"{self.timeouts.first_byte if response is None else self.timeouts.idle:g} s"
                ),
            )
        except UpstreamTooLarge as exc:
            exchange.upstream_error = "too_large"
            return await self._fail(
                response,
                UpstreamUnreachable(
                    f"upstream {upstream.address} was cut off: {exc}", code="upstream_too_large"
                ),
            )
        except UpstreamBroken as exc:
            exchange.upstream_error = "failed"
            return await self._fail(
                response, UpstreamUnreachable(f"upstream {upstream.address} failed: {exc}")
            )
        assert response is not None
        await response.write_eof(last)
        return response

    @staticmethod
    async def _fail(response: web.StreamResponse | None, error: ProxyError) -> web.StreamResponse:
        """Before the first byte, a plain error; mid-stream, an error event and a clean end."""
        if response is None:
            raise error
        await response.write(_stream_error_event(error))
        await response.write_eof()
        return response
