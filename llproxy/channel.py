"""Messages between the supervisor and its workers, one pipe per worker.

The supervisor is the control plane: it sends registry snapshots and asks for stats;
a worker announces it serves and answers. Both ends read the pipe from their event
loop, so a message is handled between requests, never concurrently with one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .config import Config
from .metrics import Telemetry
from .ratelimit import Verdict
from .registry import Registry
from .usage import UsageRecord


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process is started with (pickled to the spawned process)."""

    worker_id: int
    config: Config
    sock: socket.socket
    conn: Connection
    verbose: int
    log_format: str
    graceful_timeout: float


@dataclass(frozen=True, slots=True)
class RegistryUpdate:
    registry: Registry


@dataclass(frozen=True, slots=True)
class WorkerCount:
    workers: int


@dataclass(frozen=True, slots=True)
class StatsRequest:
    token: int


@dataclass(frozen=True, slots=True)
class Ready:
    worker_id: int
    pid: int


@dataclass(frozen=True, slots=True)
class StatsReply:
    """A worker's numbers; token 0 is the last word of a worker that is exiting."""

    token: int
    worker_id: int
    pid: int
    telemetry: Telemetry


@dataclass(frozen=True, slots=True)
class MetricsRequest:
    """From a worker asked for /metrics: the supervisor merges every worker's numbers."""

    token: int


@dataclass(frozen=True, slots=True)
class MetricsReply:
    token: int
    body: bytes


@dataclass(frozen=True, slots=True)
class UsageBatch:
    """Usage records of finished requests, for the supervisor to write."""

    records: list[UsageRecord]


@dataclass(frozen=True, slots=True)
class RateLimitRequest:
    """A worker asks the host's one counter whether `key` may make a request now."""

    token: int
    limit: str
    key: str


@dataclass(frozen=True, slots=True)
class RateLimitReply:
    token: int
    verdict: Verdict | None  # None: the supervisor could not count


Message = (
    RegistryUpdate
    | WorkerCount
    | StatsRequest
    | Ready
    | StatsReply
    | MetricsRequest
    | MetricsReply
    | RateLimitRequest
    | RateLimitReply
    | UsageBatch
)


class Channel:
    """One end of a pipe, read by the running event loop."""

    def __init__(
        self,
        conn: Connection,
        on_message: Callable[[Any], None],
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        self.conn = conn
        self._on_message = on_message
        self._on_close = on_close
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.conn.fileno(), self._readable)

    def _readable(self) -> None:
        if self._read_pending():
            self.detach()
            self._on_close()

    def _read_pending(self) -> bool:
        """Handle every message already in the pipe; True when the other end is closed."""
        try:
            while not self.conn.closed and self.conn.poll():
                self._on_message(self.conn.recv())
        except (EOFError, OSError):
            return True
        return False

    def drain(self) -> None:
        """Read what the other end sent before it went away, then close."""
        self._read_pending()
        self.detach()

    def send(self, message: Message) -> bool:
        """False when the other end is gone; its process exit is handled elsewhere."""
        try:
            self.conn.send(message)
            return True
        except OSError:
            return False

    def detach(self) -> None:
        if self._loop is not None and not self.conn.closed:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.conn.fileno())
        self._loop = None
        self.conn.close()


class Calls:
    """Requests from a worker to the supervisor that await a reply carrying the same token."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._tokens = itertools.count(1)

    async def call(self, build: Callable[[int], Message], timeout: float) -> Any:
        """The reply's payload; TimeoutError when there is none in time, ConnectionError
        when the supervisor is gone."""
        token = next(self._tokens)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[token] = waiter
        try:
            if not self.channel.send(build(token)):
                raise ConnectionError("the supervisor is gone")
            async with asyncio.timeout(timeout):
                return await waiter
        finally:
            self._waiters.pop(token, None)

    def resolve(self, token: int, payload: Any) -> None:
        waiter = self._waiters.pop(token, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(payload)
