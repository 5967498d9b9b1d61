"""The operators' desk shared by a fleet of hosts through Redis: one host holds the `Desk`
at a time (elected by a Redis lock with a TTL, renewed every second), and every host, the
holder's own included, reaches it over Redis pub/sub with the messages a worker sends its
master. A host keeps its own clients' tickets (with what reached them) and its operators,
and queues them again on a new holder when the old one is gone."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..config import Config
from ..core.desk import QUEUED, TICK_SECONDS, Desk, DeskObserver, Event, HeldDesk, Send, Ticket
from ..stores.redis import redis_client
from ..telemetry.desk import DeskTelemetry
from .channel import (
    DeskAttach,
    DeskCommand,
    DeskDetach,
    DeskMessage,
    DeskSubmit,
    DeskToClient,
    DeskToOperator,
    DeskWithdraw,
    Message,
)
from .desk import ENDINGS, DeskHost

log = logging.getLogger("llproxy.desk")

PREFIX = "llproxy:desk:"
HOLDER_KEY = PREFIX + "holder"  # the holder's token, with a TTL
INBOX = PREFIX + "inbox"  # every host → the holder
HOLDERS = PREFIX + "holders"  # the holder → every host: its token, each beat
HOST = PREFIX + "host:"  # the holder → one host

BEAT_SECONDS = 1.0  # heartbeats, and how often the lock is taken or renewed
HOLD_SECONDS = 5.0  # the lock's TTL
# A holder stops this long before its lock could expire in Redis (renewals that failed, a
# clock that runs fast): never two holders at once.
MARGIN_SECONDS = 1.5
HOLDER_LOST_SECONDS = 3.0  # a host that hears no holder this long has none
HOST_LOST_SECONDS = 5.0  # a host the holder hears nothing from this long is gone
# A subscription that hears nothing this long (every beat says something) is dead.
SILENT_SECONDS = 10.0
FLUSH_SECONDS = 2.0  # what a closing host waits for its last messages to go out
BATCH = 256  # messages published in one round trip
GONE_KEPT = 10_000

UNREACHABLE = "the shared desk is unreachable (no host holds it now): try again shortly"
REQUEUED = "its host lost touch with the desk: it is queued again"

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_TO_HOLDER: dict[str, type[DeskMessage]] = {
    cls.__name__: cls for cls in (DeskSubmit, DeskWithdraw, DeskAttach, DeskDetach, DeskCommand)
}
_TO_HOST: dict[str, type[DeskMessage]] = {
    cls.__name__: cls for cls in (DeskToClient, DeskToOperator)
}
_TICKET_FIELDS = frozenset(f.name for f in dataclasses.fields(Ticket))
ALIVE, RESYNC = "alive", "resync"  # a host's beat; the holder asking a host for everything


def encode(host: str, message: DeskMessage | str) -> bytes:
    """A desk message as JSON for Redis: its kind, its fields, the host it is from (or
    for)."""
    if isinstance(message, str):
        return orjson.dumps({"kind": message, "host": host})
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    if isinstance(message, DeskSubmit):
        fields["ticket"] = dataclasses.asdict(message.ticket)
    return orjson.dumps({"kind": type(message).__name__, "host": host, **fields})


def decode(data: bytes | str, kinds: dict[str, type[DeskMessage]]) -> tuple[str, Any]:
    """(host, message); a message is ALIVE, RESYNC or one of `kinds`. ValueError (or a
    TypeError, KeyError) for what is none."""
    document = orjson.loads(data)
    kind, host = document.pop("kind"), document.pop("host")
    if kind in (ALIVE, RESYNC):
        return host, kind
    cls = kinds[kind]
    if cls is DeskSubmit:
        # Only the fields this version knows: hosts of a fleet are upgraded one by one.
        fields = document["ticket"]
        document["ticket"] = Ticket(**{k: v for k, v in fields.items() if k in _TICKET_FIELDS})
    elif cls is DeskAttach:
        document["models"] = tuple(document["models"])
    return host, cls(**document)


def queued_again(ticket: Ticket) -> Ticket:
    """The ticket as a new holder takes it: in the queue, with what reached its client."""
    return dataclasses.replace(
        ticket,
        state=QUEUED,
        operator=None,
        conn=None,
        deadline=0.0,
        warned=False,
        parts=[ticket.text] if ticket.length else [],
        tool_calls=list(ticket.tool_calls),
    )


class Publisher:
    """Messages published in their order, in batches (one round trip each); told of each
    that reached nobody (no subscriber, or Redis did not answer)."""

    def __init__(self, client: Redis, undelivered: Callable[[str, bytes], None]) -> None:
        self.client = client
        self.undelivered = undelivered
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._failing = False

    def put(self, channel: str, data: bytes) -> None:
        self.queue.put_nowait((channel, data))

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and len(batch) < BATCH:
                batch.append(self.queue.get_nowait())
            counts = await self._publish(batch)
            for (channel, data), count in zip(batch, counts, strict=True):
                if not count:
                    self.undelivered(channel, data)
                self.queue.task_done()

    async def _publish(self, batch: list[tuple[str, bytes]]) -> list[int]:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for channel, data in batch:
                    pipe.publish(channel, data)
                counts: list[int] = await pipe.execute()
        except (RedisError, OSError) as exc:
            if not self._failing:
                log.warning("the shared desk cannot publish to Redis: %s", exc)
            self._failing = True
            return [0] * len(batch)
        self._failing = False
        return counts

    async def flush(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout)


async def listen(
    client: Redis,
    channels: list[str],
    on_message: Callable[[str, bytes], None],
    subscribed: asyncio.Event | None = None,
) -> None:
    """Subscribe (`subscribed` is set once Redis confirmed every channel) and hand on each
    message until the connection fails or stays silent for SILENT_SECONDS (then it is
    presumed dead): RedisError, OSError or TimeoutError."""
    pubsub = client.pubsub()
    confirmed = 0
    try:
        await pubsub.subscribe(*channels)
        heard = time.monotonic()
        while True:
            message = await pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if message is None:
                if now - heard > SILENT_SECONDS:
                    raise TimeoutError(f"nothing heard for {SILENT_SECONDS:g} s")
                continue
            heard = now
            if message["type"] == "subscribe":
                confirmed += 1
                if confirmed == len(channels) and subscribed is not None:
                    subscribed.set()
            elif message["type"] == "message":
                channel = message["channel"]
                name = channel.decode() if isinstance(channel, bytes) else channel
                on_message(name, message["data"])
    finally:
        with contextlib.suppress(RedisError, OSError):
            await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # untyped in older redis-py


@dataclass
class _Client:
    """A ticket of this host's, as far as its client got."""

    ticket: Ticket
    send: Send
    orphaned: float | None = None  # since when no holder was heard (monotonic)


@dataclass
class _Operator:
    name: str
    models: tuple[str, ...]
    send: Send


class Holding:
    """This host's term as the holder: the desk, its inbox, its events to each host."""

    def __init__(self, fleet: FleetDesk, token: str, valid_until: float) -> None:
        self.fleet = fleet
        self.token = token
        self.valid_until = valid_until
        self.desk = HeldDesk(exists=lambda name: fleet.exists(name), observer=fleet.observer)
        self.relay = DeskHost(self.desk)
        self.publisher = Publisher(fleet.client, lambda channel, data: None)
        self.heard: dict[str, float] = {}  # host → when it last said something
        self.lost: set[str] = set()  # hosts given up for gone, that may come back
        self.broken = False  # its inbox failed, or its lock lapsed
        self._tasks: list[asyncio.Task[None]] = []
        self._guard: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # The inbox is listened to before anyone is told of this holder.
        subscribed = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._listen(subscribed), name="llproxy-desk-inbox"))
        self._tasks.append(asyncio.create_task(self.publisher.run(), name="llproxy-desk-out"))
        try:
            await asyncio.wait_for(subscribed.wait(), HOLD_SECONDS - MARGIN_SECONDS)
        except TimeoutError:
            self.broken = True
            return
        self.desk.start()
        self._guard = asyncio.create_task(self._lapse(), name="llproxy-desk-lapse")
        self.beat()

    async def _lapse(self) -> None:
        """Past `valid_until` (renewed by the election) the lock may be another host's:
        this desk falls silent then, even if the election is slow to notice."""
        # A deadline that moves (each renewal), not an event: sleep until it stays put.
        while True:
            left = self.valid_until - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(left)
        log.warning("this host's lock on the operators' desk lapsed: it stops holding it")
        self.broken = True
        await self._halt()

    async def _halt(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.desk.close()

    async def _listen(self, subscribed: asyncio.Event) -> None:
        try:
            await listen(
                self.fleet.subscriber, [INBOX], lambda _, data: self.handle(data), subscribed
            )
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("the shared desk's inbox failed (%s): this host stops holding it", exc)
        finally:
            self.broken = True
            subscribed.set()

    def beat(self) -> None:
        self.publisher.put(HOLDERS, orjson.dumps({"token": self.token}))
        now = time.monotonic()
        for host, heard in list(self.heard.items()):
            if now - heard > HOST_LOST_SECONDS:
                del self.heard[host]
                self.lost.add(host)
                log.warning("host %s of the operators' desk went silent: its requests end", host)
                self.relay.worker_gone(host, "the host holding the client's request is gone")

    def handle(self, data: bytes) -> None:
        try:
            host, message = decode(data, _TO_HOLDER)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("the shared desk skipped a message it cannot read: %s", exc)
            return
        if host in self.lost:  # it was given up for gone, and took its tickets with it
            self.lost.discard(host)
            self.publisher.put(HOST + host, encode(host, RESYNC))
        self.heard[host] = time.monotonic()
        if message == ALIVE:
            return
        try:
            self.relay.handle(host, self._sender(host), message)
        except Exception:  # one message it trips over must not stop the desk
            log.exception("the shared desk failed on a %s", type(message).__name__)

    def _sender(self, host: str) -> Callable[[Message], bool]:
        def send(message: Message) -> bool:
            # DeskHost sends a host only what the desk says (DeskToClient, DeskToOperator).
            if isinstance(message, DeskToClient | DeskToOperator):
                self.publisher.put(HOST + host, encode(host, message))
            return True

        return send

    async def close(self) -> None:
        if not self.broken:
            await self.publisher.flush(FLUSH_SECONDS)
        if self._guard is not None:
            self._guard.cancel()
            await asyncio.gather(self._guard, return_exceptions=True)
        await self._halt()


class FleetDesk:
    """A host's port to the fleet's desk, and its candidacy to hold it: what a host's
    master (or a process serving alone) holds in place of a `HeldDesk` when the config
    has `redis_url`."""

    def __init__(self, url: str, observer: DeskObserver | None = None) -> None:
        self.host = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.exists: Callable[[str], bool] = lambda name: True
        self.observer = observer
        self.client = redis_client(url)
        # Subscriptions block on their connection: a client of their own, without the
        # pool's read timeout (a beat comes each second; SILENT_SECONDS catches a dead one).
        self.subscriber = Redis.from_url(url, socket_connect_timeout=2, socket_keepalive=True)
        self.clients: dict[str, _Client] = {}
        self.operators: dict[str, _Operator] = {}  # by their conn across the fleet
        # Withdrawals and detaches a holder may have missed, sent again with the rest; a
        # long outage keeps the latest (one missed leaves a ticket until its deadline).
        self.gone: collections.deque[bytes] = collections.deque(maxlen=GONE_KEPT)
        self.holder: str | None = None  # the token of the holder last heard
        self.holder_heard = float("-inf")
        self.dirty = False  # a holder may lack some of this host's tickets or operators
        self.holding: Holding | None = None
        self.publisher = Publisher(self.client, self._undelivered)
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)
        self._tasks: list[asyncio.Task[None]] = []
        self._started = time.monotonic()
        self._was_live = False
        self._cut_off = False  # its subscription failed, and no holder was heard since

    @property
    def held(self) -> HeldDesk | None:
        """The desk itself while this host holds it (its numbers are this host's)."""
        return self.holding.desk if self.holding is not None else None

    @property
    def live(self) -> bool:
        return time.monotonic() - self.holder_heard < HOLDER_LOST_SECONDS

    # --- DeskPort ----------------------------------------------------------------------------

    def start(self) -> None:
        self._started = time.monotonic()
        for name, run in (
            ("out", self.publisher.run),
            ("in", self._listen),
            ("beat", self._beat),
            ("clock", self._clock),
        ):
            self._tasks.append(asyncio.create_task(run(), name=f"llproxy-fleet-desk-{name}"))

    async def close(self) -> None:
        await self.publisher.flush(FLUSH_SECONDS)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._step_down("this host stops", quiet=True)
        await self.client.aclose(close_connection_pool=True)
        await self.subscriber.aclose(close_connection_pool=True)

    def submit(self, ticket: Ticket, send: Send) -> None:
        self.clients[ticket.id] = _Client(ticket, send)
        self._to_holder(DeskSubmit(ticket))

    def withdraw(self, ticket_id: str, reason: str = "client left") -> None:
        if self.clients.pop(ticket_id, None) is not None:
            self._to_holder(DeskWithdraw(ticket_id, reason))

    def attach(self, conn: str, name: str, models: tuple[str, ...], send: Send) -> None:
        conn = self._conn(conn)
        self.operators[conn] = _Operator(name, models, send)
        # A host just started may not have heard the holder yet: that is no outage.
        started_long_ago = time.monotonic() - self._started > HOLDER_LOST_SECONDS
        if not self.live and (self._cut_off or started_long_ago):
            send({"type": "error", "message": f"{UNREACHABLE}; the queue comes once it is back"})
        self._to_holder(DeskAttach(conn, name, models))

    def detach(self, conn: str) -> None:
        conn = self._conn(conn)
        if self.operators.pop(conn, None) is not None:
            self._to_holder(DeskDetach(conn))

    def command(self, conn: str, command: Event) -> None:
        conn = self._conn(conn)
        if not self.live:
            self._refuse(conn, command, UNREACHABLE)
        elif conn in self.operators:
            self._to_holder(DeskCommand(conn, command))

    # --- to the holder -----------------------------------------------------------------------

    def _conn(self, conn: str) -> str:
        """A socket's name across the fleet (each host counts its own from 1)."""
        return f"{self.host}/{conn}"

    def _to_holder(self, message: DeskMessage | str) -> None:
        if not self.live and message != ALIVE:
            # Nobody (heard) to take it: a new holder gets everything of this host's.
            self.dirty = True
            if isinstance(message, DeskWithdraw | DeskDetach):
                self.gone.append(encode(self.host, message))
            return
        self.publisher.put(INBOX, encode(self.host, message))

    def _undelivered(self, channel: str, data: bytes) -> None:
        """No holder took it: what it meant is sent again to the next (or this one, once
        it is heard again); a command is refused at once."""
        self.dirty = True
        with contextlib.suppress(ValueError, TypeError, KeyError):
            _, message = decode(data, _TO_HOLDER)
            if isinstance(message, DeskCommand):
                self._refuse(message.conn, message.command, UNREACHABLE)
            elif isinstance(message, DeskWithdraw | DeskDetach):
                self.gone.append(data)

    def _refuse(self, conn: str, command: Event, reason: str) -> None:
        operator = self.operators.get(conn)
        if operator is None:
            return
        refusal = {"type": "refused", "id": command.get("id"), "command": command.get("type")}
        if isinstance(command.get("request"), str):
            refusal["request"] = command["request"]
        operator.send({**refusal, "reason": reason})

    def _resync(self) -> None:
        """Everything of this host's, to the holder again: what it has of it is taken off
        first (it may have missed some of it), so nothing is there twice."""
        self.dirty = False
        while self.gone:
            self.publisher.put(INBOX, self.gone.popleft())
        for ticket_id, client in self.clients.items():
            self._to_holder(DeskWithdraw(ticket_id, REQUEUED))
            self._to_holder(DeskSubmit(queued_again(client.ticket)))
        for conn, operator in self.operators.items():
            self._to_holder(DeskDetach(conn))
            self._to_holder(DeskAttach(conn, operator.name, operator.models))

    # --- from the holder ---------------------------------------------------------------------

    async def _listen(self) -> None:
        failing = False
        channels = [HOLDERS, HOST + self.host]
        while True:
            subscribed = asyncio.Event()
            try:
                await listen(self.subscriber, channels, self._on_message, subscribed)
            except (RedisError, OSError, TimeoutError) as exc:
                if subscribed.is_set() or not failing:  # once an outage
                    log.warning("the shared desk cannot hear its holder: %s", exc)
                failing = self._cut_off = True
            # What was said meanwhile is lost: the holder gets everything again.
            self.dirty = True
            await asyncio.sleep(BEAT_SECONDS)

    def _on_message(self, channel: str, data: bytes) -> None:
        try:
            if channel == HOLDERS:
                self._heard_holder(orjson.loads(data)["token"])
                return
            _, message = decode(data, _TO_HOST)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("the shared desk skipped a message it cannot read: %s", exc)
            return
        if message == RESYNC:
            self._resync()
        elif isinstance(message, DeskToClient):
            self._to_client(message)
        elif isinstance(message, DeskToOperator):
            operator = self.operators.get(message.conn)
            if operator is not None:
                operator.send(message.event)

    def _heard_holder(self, token: str) -> None:
        if token != self.holder:
            # A new holder has an empty desk: everything of this host's goes to it.
            if self.holder is not None or self.clients or self.operators:
                self.dirty = True
            if self.holder is not None:
                log.info("the operators' desk has a new holder")
            self.holder = token
        self.holder_heard = time.monotonic()
        self._cut_off = False
        if self.dirty:
            self._resync()

    def _to_client(self, message: DeskToClient) -> None:
        event = message.event
        kind = event.get("type")
        client = (
            self.clients.pop(message.ticket_id, None)
            if kind in ENDINGS
            else self.clients.get(message.ticket_id)
        )
        if client is None:
            return
        # What reached the client, kept so a new holder can queue the ticket with it.
        if kind == "delta":
            client.ticket.add_text(event["text"])
        elif kind == "tool_call":
            client.ticket.add_call({k: event[k] for k in ("id", "name", "arguments")})
        client.send(event)

    # --- time ------------------------------------------------------------------------------

    async def _clock(self) -> None:
        """With no holder heard, this host's tickets keep their timeouts here."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self._orphans()
            except Exception:
                log.exception("the shared desk's clock tick failed")

    def _orphans(self) -> None:
        now = time.monotonic()
        live = self.live
        if self._was_live and not live:
            log.warning("no holder of the operators' desk heard for %g s", HOLDER_LOST_SECONDS)
            for operator in self.operators.values():
                message = f"{UNREACHABLE}; the queue comes again once it is back"
                operator.send({"type": "error", "message": message})
        self._was_live = live
        for ticket_id, client in list(self.clients.items()):
            if live or client.orphaned is None:
                client.orphaned = None if live else now
                continue
            ticket = client.ticket
            answered = bool(ticket.length or ticket.tool_calls)
            waited = "idle_timeout" if answered else "queue_timeout"
            if now - client.orphaned < getattr(ticket, waited):
                continue
            del self.clients[ticket_id]
            log.warning("request %s timed out with no holder of the desk to be heard", ticket_id)
            event = {"type": "timeout", "waited": waited, "fallback": ticket.fallback}
            client.send({**event, "text": ticket.text})

    async def _beat(self) -> None:
        """Each beat: this host says it is alive, and takes or keeps the desk's lock."""
        while True:
            self._to_holder(ALIVE)
            try:
                await self._elect()
            except Exception:  # the election must go on
                log.exception("the shared desk's election failed")
            await asyncio.sleep(BEAT_SECONDS)

    async def _elect(self) -> None:
        asked = time.monotonic()
        holding = self.holding
        if holding is not None and (holding.broken or asked > holding.valid_until):
            await self._step_down("it could not keep its lock or its inbox")
            return
        ttl = int(HOLD_SECONDS * 1000)
        try:
            if holding is None:
                token = secrets.token_hex(8)
                if await self.client.set(HOLDER_KEY, token, nx=True, px=ttl):
                    await self._take(token, asked + HOLD_SECONDS - MARGIN_SECONDS)
                return
            if not await self._renew(keys=[HOLDER_KEY], args=[holding.token, ttl]):
                await self._step_down("another host took its lock")
                return
        except (RedisError, OSError) as exc:
            log.debug("the shared desk's lock: %s", exc)
            return
        holding.valid_until = asked + HOLD_SECONDS - MARGIN_SECONDS
        holding.beat()

    async def _take(self, token: str, valid_until: float) -> None:
        holding = Holding(self, token, valid_until)
        self.holding = holding
        await holding.start()
        log.info("this host holds the operators' desk for the fleet (%s)", self.host)

    async def _step_down(self, why: str, quiet: bool = False) -> None:
        holding, self.holding = self.holding, None
        if holding is None:
            return
        (log.info if quiet else log.warning)(
            "this host no longer holds the operators' desk: %s", why
        )
        await holding.close()
        with contextlib.suppress(RedisError, OSError):
            await self._release(keys=[HOLDER_KEY], args=[holding.token])


def host_desk(config: Config) -> HeldDesk | FleetDesk:
    """The desk a host holds for its workers (or a process serving alone for itself):
    its own, or with `redis_url` its port to the fleet's."""
    if config.redis_url is not None:
        return FleetDesk(config.redis_url, observer=DeskTelemetry())
    return HeldDesk(observer=DeskTelemetry())


def desk_in_hand(desk: object) -> Desk | None:
    """The desk itself, where this process holds it now (its numbers for /metrics)."""
    if isinstance(desk, FleetDesk):
        return desk.held
    return desk if isinstance(desk, Desk) else None
