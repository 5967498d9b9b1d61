"""The worker's HTTP/1.1 client to upstreams: keep-alive connection pools on asyncio protocols.

Responses are parsed by httptools (llhttp, the parser Node.js uses) straight from the
transport's reads, so a chunk reaches the caller as soon as it arrives, with one small
object per request instead of a general-purpose client's machinery. It sends only what the
proxy sends (a POST with a complete body) and is strict about what it accepts back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import quote, urlsplit

import httptools

from ...config import Config
from ...core.call import JSON
from ...core.encoding import BodyEncodingError, BodyTooLarge, BoundedDecoder
from ...core.registry import Upstream

# An upstream's status line and headers; more is a broken or hostile server.
MAX_HEAD_BYTES = 64 * 1024
_HEAD_TOO_LARGE = f"response head larger than {MAX_HEAD_BYTES} bytes"
# Body bytes buffered for a slow reader before the upstream socket stops being read.
HIGH_WATER = 256 * 1024
# Characters left as they are in a request path; everything else is percent-encoded.
_PATH_SAFE = "/-._~!$&'()*+,;=:@"


class ConnectFailed(Exception):
    """No connection could be made; nothing was sent, so another replica may be tried."""


class UpstreamBroken(Exception):
    """The upstream answered with something that is not a complete HTTP response."""


class UpstreamTooLarge(UpstreamBroken):
    """The upstream sent more than a bound allows; it is cut off there."""


@dataclass(frozen=True, slots=True)
class ResponseBounds:
    """What one upstream response may send: any upstream is untrusted, since discovery
    takes whatever listens on a scanned port."""

    body_bytes: int = 64 * 1024 * 1024  # a whole (not streamed) body, decoded
    event_bytes: int = 4 * 1024 * 1024  # one server-sent event of a stream
    compression_ratio: int = 100  # decoded bytes per received byte


def response_bounds(config: Config) -> ResponseBounds:
    return ResponseBounds(
        config.max_response_bytes, config.max_event_bytes, config.max_compression_ratio
    )


class _Stale(Exception):
    """A pooled connection was closed by the upstream before it read the request."""


# Clients name a handful of paths over and over; quoting each anew showed in profiles.
@functools.lru_cache(maxsize=256)
def request_path(path: str) -> str:
    """A client's path below /v1/, made safe to put on the request line; ValueError when
    it has empty, `.` or `..` segments (it could otherwise leave the upstream's /v1/)."""
    segments = path.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise ValueError(path)
    return quote(path, safe=_PATH_SAFE)


@dataclass(frozen=True, slots=True)
class _Route:
    """How to reach one upstream and the fixed part of every request to it."""

    key: tuple[str, str, int]
    host: str
    port: int
    tls: bool
    path_prefix: str  # the base URL's path, usually /v1
    head_fields: bytes  # Host, Authorization and the fixed fields, CRLF-terminated

    @classmethod
    def of(cls, upstream: Upstream) -> _Route:
        parts = urlsplit(upstream.base_url)
        tls = parts.scheme == "https"
        host = upstream.hostname
        netloc = f"[{host}]" if ":" in host else host
        if upstream.port != (443 if tls else 80):
            netloc = f"{netloc}:{upstream.port}"
        fields = [
            f"Host: {netloc}",
            "Accept-Encoding: identity",
            *(f"{name}: {value}" for name, value in upstream.auth_headers().items()),
        ]
        return cls(
            key=(parts.scheme, host, upstream.port),
            host=host,
            port=upstream.port,
            tls=tls,
            # Already-escaped characters stay as they are; the rest must be ASCII.
            path_prefix=quote(parts.path.rstrip("/"), safe=_PATH_SAFE + "%"),
            head_fields="".join(f"{field}\r\n" for field in fields).encode(),
        )

    def fields_with(self, extra: Mapping[str, str]) -> bytes:
        """The fixed fields with `extra` in place of those of the same names (a value with
        a line break or other control character is left out: it would split the head)."""
        names = {name.lower() for name in extra}
        kept = [
            line
            for line in self.head_fields.split(b"\r\n")
            if line and line.split(b":", 1)[0].decode("latin-1").lower() not in names
        ]
        kept += [
            f"{name}: {value}".encode("latin-1", "replace")
            for name, value in extra.items()
            if value.isprintable()
        ]
        return b"".join(line + b"\r\n" for line in kept)


class UpstreamResponse:
    """One response: status and headers at once, the body as it arrives.

    `release()` hands a fully read keep-alive connection back to its pool; `close()` drops
    the connection, which is how a cancelled or abandoned request stops the upstream.
    """

    def __init__(self, connection: _Connection, bounds: ResponseBounds) -> None:
        self._connection = connection
        self._bounds = bounds
        self.status = 0
        self.headers: dict[str, str] = {}
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._decoder: BoundedDecoder | None = None
        # A whole body is bounded in size; a stream (which may run for hours) per event.
        self._body_limit: int | None = None
        self._received = 0
        self._event_limit: int | None = None
        self._since_event_end = 0
        self._seam = b""  # a stream's last bytes, where an event end may begin
        self.complete = False
        self.error: Exception | None = None
        # The media type, lower case and without parameters, as aiohttp reports it (known
        # once the head is in).
        self.content_type = ""

    def at_eof(self) -> bool:
        return self.complete and not self._chunks

    async def chunk(self) -> bytes:
        """Whatever body bytes have arrived, waiting for some; b"" at the end."""
        while not self._chunks:
            if self.error is not None:
                # A fresh exception each time: the stored one raised here would hold this
                # frame (and through it the response, and the reader's frames with the
                # body read so far) in a cycle that only the cyclic collector frees.
                raise _fresh(self.error)
            if self.complete:
                return b""
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self._connection.resume()
        return data

    async def read(self, limit: int | None = None) -> bytes:
        """The body to its end, or its first `limit` bytes or a little more."""
        parts: list[bytes] = []
        size = 0
        try:
            while limit is None or size < limit:
                data = await self.chunk()
                if not data:
                    break
                parts.append(data)
                size += len(data)
        except BaseException:
            # An answer cut at its bound is up to max_response_bytes: let it go now, not
            # whenever the traceback that holds this frame is collected.
            parts.clear()
            raise
        body = b"".join(parts)
        parts.clear()
        return body if limit is None else body[:limit]

    def release(self) -> None:
        self._connection.finish(self)

    def close(self) -> None:
        self._connection.drop()

    # --- fed by the connection ---------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _start_body(self) -> None:
        self.content_type = self.headers.get("content-type", "").partition(";")[0].strip().lower()
        encoding = self.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            self._decoder = BoundedDecoder(encoding, self._bounds.compression_ratio)
        if self.content_type == "text/event-stream":
            self._event_limit = self._bounds.event_bytes
        else:
            self._body_limit = self._bounds.body_bytes

    def _feed(self, data: bytes) -> bool:
        """Queue body bytes; True when the reader has fallen behind."""
        if self._decoder is not None:
            data = self._decoder.decode(data)
            if not data:
                return False
        self._count(data)
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake()
        return self._buffered > HIGH_WATER

    def _count(self, data: bytes) -> None:
        """Hold the decoded bytes against the response's bound."""
        if self._body_limit is not None:
            self._received += len(data)
            if self._received > self._body_limit:
                raise BodyTooLarge(f"response body larger than {self._body_limit} bytes")
        elif self._event_limit is not None:
            if data[-2:] == b"\n\n":
                # An HTTP chunk per event, as servers write them: it ends one (the searches
                # below cost ~0.3 µs a chunk, measured).
                self._since_event_end = 2
                self._seam = b"\n\n"
                return
            # An event ends at a blank line; one that never ends is cut at the bound.
            end = max(data.rfind(b"\n\n"), data.rfind(b"\n\r\n"))
            if end >= 0:
                self._since_event_end = len(data) - end
            elif (seam := self._seam + data[:2]).find(b"\n\n") >= 0 or seam.find(b"\n\r\n") >= 0:
                self._since_event_end = len(data)
            else:
                self._since_event_end += len(data)
            self._seam = data[-2:]
            if self._since_event_end > self._event_limit:
                raise BodyTooLarge(f"stream event larger than {self._event_limit} bytes")

    def _finish(self) -> None:
        if self._decoder is not None and (rest := self._decoder.flush()):
            self._count(rest)
            self._chunks.append(rest)
        self.complete = True
        self._wake()

    def _fail(self, error: Exception) -> None:
        if not self.complete and self.error is None:
            self.error = error
            self._wake()


def _fresh(error: Exception) -> Exception:
    """A copy of a stored error to raise, without its traceback."""
    copy = type(error)(*error.args) if isinstance(error, UpstreamBroken) else error
    return copy.with_traceback(None)


def _parser_failure(exc: Exception) -> UpstreamBroken:
    """What the parser's error says about the upstream. A callback's own error (a bound
    crossed, a bad gzip stream, an unknown encoding) is the cause, and says it better.
    Read here, not in `data_received`: a local there holding it would close a cycle (its
    traceback's frames lead back to that frame, with the read in it) that only the cyclic
    collector frees."""
    cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else None
    return _as_upstream_error(cause) or UpstreamBroken(f"malformed response: {exc}")


def _as_upstream_error(cause: BaseException | None) -> UpstreamBroken | None:
    """What an error raised while reading an answer says about the upstream."""
    if isinstance(cause, UpstreamBroken):
        return cause
    if isinstance(cause, BodyTooLarge):
        return UpstreamTooLarge(str(cause))
    if isinstance(cause, BodyEncodingError):
        return UpstreamBroken(str(cause))
    if cause is not None:
        return UpstreamBroken(f"malformed response: {cause}")
    return None


class _Connection(asyncio.Protocol):
    """One connection to one upstream, carrying one request at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.bounds = pool.bounds
        self.key = key
        # Made on the loop it serves, which is kept: asyncio.get_running_loop() is a
        # getpid() system call each time on Python 3.11, twice a streamed chunk.
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.head_ready: asyncio.Future[UpstreamResponse] | None = None
        self.head_bytes = 0  # received while the head is incomplete
        self.field_bytes = 0  # in the header fields parsed so far
        self.received_any = False
        self.reusable = False
        self.reused = False  # taken from the pool, so the upstream may have closed it
        self.idle_since = 0.0
        self.paused = False

    # --- used by the pool and the response --------------------------------------------

    def send(self, head: bytes, payload: bytes) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        self.response = UpstreamResponse(self, self.bounds)
        self.head_ready = self.loop.create_future()
        self.head_bytes = self.field_bytes = 0
        self.received_any = False
        self.reusable = False
        self.transport.write(head + payload)
        return self.head_ready

    def finish(self, response: UpstreamResponse) -> None:
        if response is self.response and response.at_eof() and self.reusable:
            self.response = None
            self.pool.put_back(self)
        else:
            self.drop()

    def drop(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # nothing was asked: a broken server
            self.drop()
            return
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(_parser_failure(exc))
            return
        if self.head_ready is not None:  # the head is still incomplete
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._fail(UpstreamBroken(_HEAD_TOO_LARGE))

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.pool.forget(self)
        response = self.response
        if response is None or response.complete:
            return
        if self.head_ready is not None and not self.received_any:
            self._fail(_Stale() if self.reused else UpstreamBroken("closed"))
        elif self.head_ready is None and self._ends_at_close(response):
            try:
                response._finish()
            except BodyEncodingError as error:  # its last compressed bytes were bad
                response._fail(_as_upstream_error(error) or error)
        else:
            self._fail(UpstreamBroken("connection closed before the response was complete"))

    # --- httptools callbacks ----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        # Counted here too: a whole oversized head can arrive in a single read.
        self.field_bytes += len(name) + len(value)
        if self.field_bytes > MAX_HEAD_BYTES:
            raise UpstreamBroken(_HEAD_TOO_LARGE)
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue); the real one follows
            response.headers.clear()
            return
        response.status = status
        response._start_body()
        ready, self.head_ready = self.head_ready, None
        if ready is not None and not ready.done():
            ready.set_result(response)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        if self.response._feed(body) and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        response = self.response
        if response is None or self.head_ready is not None:  # end of an interim answer
            return
        self.reusable = self.parser.should_keep_alive()
        response._finish()

    # --- internals --------------------------------------------------------------------

    @staticmethod
    def _ends_at_close(response: UpstreamResponse) -> bool:
        """A body without length or chunking is delimited by the connection's end."""
        framing = response.headers.get("transfer-encoding", "").lower()
        return "content-length" not in response.headers and "chunked" not in framing

    def _fail(self, error: Exception) -> None:
        ready, self.head_ready = self.head_ready, None
        if ready is not None and not ready.done():
            ready.set_exception(error)
        elif self.response is not None:
            self.response._fail(error)
        self.drop()


def _root(prefix: str) -> str:
    """The server's root below an OpenAI base path (`/v1` → ``, `/x/v1` → `/x`), where
    servers such as llama.cpp and vLLM answer their own routes (/tokenize)."""
    return prefix.removesuffix("/v1")


class UpstreamPool:
    """Idle keep-alive connections per upstream address, reused most recent first."""

    def __init__(
        self, connect_timeout: float, keepalive: float, bounds: ResponseBounds | None = None
    ) -> None:
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.bounds = bounds or ResponseBounds()
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._routes: dict[Upstream, _Route] = {}
        self._tls: ssl.SSLContext | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def post(
        self,
        upstream: Upstream,
        path: str,
        payload: bytes,
        content_type: bytes = JSON,
        via: str = "",
        from_root: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> UpstreamResponse:
        """Send the request and wait for the response's status and headers.

        Raises ConnectFailed when no connection could be made, UpstreamBroken when the
        upstream's answer was not HTTP. A pooled connection the upstream had just closed
        is retried once on a fresh one: the upstream never saw the request.
        """
        route = self._routes.get(upstream)
        if route is None:
            route = self._routes[upstream] = _Route.of(upstream)
        head = (
            (
                f"POST {_root(route.path_prefix) if from_root else route.path_prefix}/{path} "
                f"HTTP/1.1\r\nContent-Length: {len(payload)}\r\n"
            ).encode("latin-1")
            + b"Content-Type: "
            + content_type
            + b"\r\n"
            + (b"Via: " + via.encode("latin-1", "replace") + b"\r\n" if via else b"")
            + (route.fields_with(headers) if headers else route.head_fields)
            + b"\r\n"
        )
        connection = self._take_idle(route.key)
        while True:
            if connection is None:
                connection = await self._connect(route)
            try:
                return await connection.send(head, payload)
            except _Stale:
                connection = None  # raised only by a pooled one, so this retries once
            except BaseException:
                connection.drop()
                raise

    def _take_idle(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        oldest_allowed = time.monotonic() - self.keepalive
        while idle:
            connection = idle.pop()
            if connection.closed or connection.idle_since < oldest_allowed:
                connection.drop()
                continue
            connection.reused = True
            return connection
        return None

    async def _connect(self, route: _Route) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if route.tls else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, route.key),
                    route.host,
                    route.port,
                    ssl=tls,
                    server_hostname=route.host if tls else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"no connection within {self.connect_timeout:g} s") from None
        except OSError as exc:  # refused, unreachable, unresolvable, TLS handshake
            raise ConnectFailed(exc.strerror or type(exc).__name__) from exc
        self._ensure_sweeper()
        return connection

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    # --- the pool's bookkeeping -------------------------------------------------------

    def put_back(self, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.key, []).append(connection)

    def forget(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="llproxy-upstream-sweep")

    async def _sweep(self) -> None:
        """Close connections idle past the keep-alive time, so none lingers unused."""
        while True:
            await asyncio.sleep(self.keepalive / 2)
            oldest_allowed = time.monotonic() - self.keepalive
            for idle in self._idle.values():
                for connection in [c for c in idle if c.idle_since < oldest_allowed]:
                    idle.remove(connection)
                    connection.drop()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for idle in self._idle.values():
            for connection in idle:
                connection.drop()
        self._idle.clear()
