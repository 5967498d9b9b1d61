"""Messages between the supervisor and its workers, one socket pair per worker.

The supervisor is the control plane: it sends registry snapshots and asks for stats; a
worker announces it serves, sends its usage records, and asks for what the host shares
(merged metrics, counting a client its rate table cannot hold). Both ends read the pipe
from their event loop, so a message is handled between requests, never concurrently with
one; a request and its reply carry the same token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pickle
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..core.desk import Ticket
from ..core.ratelimit import Verdict
from ..core.registry import Registry
from ..core.usage import UsageRecord
from ..stores import HostShare
from ..telemetry.metrics import Telemetry

log = logging.getLogger("llproxy.channel")


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process is started with (pickled to the spawned process)."""

    worker_id: int
    config: Config
    sock: socket.socket  # its slot's listening socket, or the one shared (listeners.py)
    channel: socket.socket  # the worker's end of its socket pair with the supervisor
    host: HostShare  # the host's rate table, shared by every worker
    verbose: int
    log_format: str
    graceful_timeout: float


# --- supervisor → worker -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegistryUpdate:
    registry: Registry


@dataclass(frozen=True, slots=True)
class WorkerCount:
    workers: int


@dataclass(frozen=True, slots=True)
class StatsRequest:
    token: int


# --- worker → supervisor -------------------------------------------------------------


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
    # Which store holds what and whether it answered (Services.health), as /health says.
    stores: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UsageBatch:
    """Usage records of finished requests, for the supervisor to write."""

    records: list[UsageRecord]


@dataclass(frozen=True, slots=True)
class MetricsRequest:
    """From a worker asked for /metrics: the supervisor merges every worker's numbers."""

    token: int


@dataclass(frozen=True, slots=True)
class RateLimitRequest:
    """A client the host's rate table cannot hold: the supervisor counts it."""

    token: int
    limit: str
    client: str


# --- the operators' desk, which the supervisor holds ----------------------------------


@dataclass(frozen=True, slots=True)
class DeskSubmit:
    ticket: Ticket


@dataclass(frozen=True, slots=True)
class DeskWithdraw:
    ticket_id: str
    reason: str = "client left"


@dataclass(frozen=True, slots=True)
class DeskAttach:
    conn: str
    name: str
    models: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeskDetach:
    conn: str


@dataclass(frozen=True, slots=True)
class DeskCommand:
    conn: str
    command: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeskToClient:
    """What the desk says to a ticket's client (in the worker that holds it)."""

    ticket_id: str
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeskToOperator:
    """What the desk says to an operator's socket (in the worker that holds it)."""

    conn: str
    event: dict[str, Any]


DeskMessage = (
    DeskSubmit
    | DeskWithdraw
    | DeskAttach
    | DeskDetach
    | DeskCommand
    | DeskToClient
    | DeskToOperator
)


# --- replies, to whoever asked --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricsReply:
    token: int
    body: bytes


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
    | UsageBatch
    | MetricsRequest
    | RateLimitRequest
    | MetricsReply
    | RateLimitReply
    | DeskMessage
)
Reply = StatsReply | MetricsReply | RateLimitReply


class Channel:
    """One end of a socket pair, read and written by the running event loop.

    Messages are pickled and framed by a 4-byte length. Writing goes into the transport's
    buffer and never blocks the loop, and a message of any size is read in as many pieces
    as it arrives in: a blocking pipe could deadlock two processes that both send large
    messages, and a non-blocking one (uvloop makes watched descriptors non-blocking)
    breaks `multiprocessing.Connection.recv` on any message larger than one read.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[Any], None],
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        self.sock = sock
        self._on_message = on_message
        self._on_close = on_close
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None

    async def attach(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self.sock)
        self._reading = asyncio.create_task(self._read(reader), name="llproxy-channel")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(4), "big")
                payload = await reader.readexactly(size)
                try:
                    self._on_message(pickle.loads(payload))
                except Exception:
                    # One message this end trips over must not end the channel: it
                    # carries everything else the other process says, for its lifetime.
                    log.exception("a message on the channel failed; going on")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the other end closed: its process exited or is exiting
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._on_close()

    def send(self, message: Message) -> bool:
        """False when the other end is gone; its process exit is handled elsewhere."""
        if self._writer is None or self._writer.is_closing():
            return False
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(len(payload).to_bytes(4, "big") + payload)
        return True

    async def closed(self, timeout: float) -> None:
        """Wait until everything the other end sent was handled and it closed."""
        if self._reading is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._reading)
        await self.close()

    async def close(self) -> None:
        """Send what is buffered, then close; the reader ends by itself."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        if self._reading is not None and not self._reading.done():
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading


class Calls:
    """Requests over a channel that await the reply carrying the same token, either way:
    a worker asking the supervisor, or the supervisor asking a worker."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._tokens = itertools.count(1)

    async def call(self, build: Callable[[int], Message], timeout: float) -> Any:
        """The reply; TimeoutError when there is none in time, ConnectionError when the
        other end is gone."""
        token = next(self._tokens)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[token] = waiter
        try:
            if not self.channel.send(build(token)):
                raise ConnectionError("the other end is gone")
            async with asyncio.timeout(timeout):
                return await waiter
        finally:
            self._waiters.pop(token, None)

    def resolve(self, reply: Reply) -> None:
        waiter = self._waiters.pop(reply.token, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)
