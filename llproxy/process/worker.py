"""A worker process: serves its listening socket with the llproxy app under uvloop.

It makes its event loop only after it started, takes registry snapshots from the
supervisor instead of scanning, starts serving once it has the first one, and on SIGTERM
(or when the supervisor vanishes) retires without dropping a request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
from typing import Any

import uvloop
from aiohttp import web

from ..core.errors import ServiceUnavailable
from ..core.ratelimit import Verdict
from ..server.app import create_app
from ..server.http import AppRunner
from ..server.operator import close_operator_sockets
from ..server.state import STATE, ProxyState
from ..stores import build_services
from ..ui.logs import setup_logging
from .channel import (
    Calls,
    Channel,
    DeskToClient,
    DeskToOperator,
    MetricsReply,
    MetricsRequest,
    RateLimitReply,
    RateLimitRequest,
    Ready,
    RegistryUpdate,
    StatsReply,
    StatsRequest,
    UsageBatch,
    WorkerCount,
    WorkerSpec,
)
from .desk import ChannelDesk
from .listeners import BACKLOG
from .memory import settle_heap, trim_after_bursts

log = logging.getLogger("llproxy.worker")

SUPERVISOR_TIMEOUT = 5.0
# Once nothing is in flight, how long a retiring worker keeps its keep-alive connections
# open for a client's next request (answered with `Connection: close`): closing one just
# as the client sends on it would fail that request.
IDLE_GRACE = 1.0


def worker_main(spec: WorkerSpec) -> None:
    # Ctrl-C at a terminal signals the whole process group; the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(spec.verbose, spec.log_format, secrets=spec.config.secrets())
    uvloop.run(serve(spec))


async def serve(spec: WorkerSpec) -> None:
    stop: asyncio.Queue[str] = asyncio.Queue()
    has_registry = asyncio.Event()
    channel = Channel(
        spec.channel,
        lambda message: on_message(message),
        lambda: stop.put_nowait("supervisor gone"),
    )
    calls = Calls(channel)

    async def overflow(limit: str, client: str) -> Verdict:
        try:
            reply: RateLimitReply = await calls.call(
                lambda token: RateLimitRequest(token, limit, client), SUPERVISOR_TIMEOUT
            )
        except (TimeoutError, ConnectionError):
            reply = RateLimitReply(0, None)
        if reply.verdict is None:
            raise ServiceUnavailable("the rate limiter is unavailable")
        return reply.verdict

    desk = ChannelDesk(channel.send)
    services = build_services(
        spec.config,
        host=spec.host,
        forward_usage=lambda records: channel.send(UsageBatch(records)),
        overflow=overflow,
        desk=desk,
    )
    app = create_app(spec.config, services, worker_id=spec.worker_id, discover=False)
    state = app[STATE]

    def stats() -> StatsReply:
        return StatsReply(0, spec.worker_id, os.getpid(), state.numbers(), state.services.health())

    def on_message(message: Any) -> None:
        match message:
            case RegistryUpdate(registry):
                state.set_registry(registry)
                has_registry.set()
            case WorkerCount(workers):
                state.workers = workers
            case StatsRequest(token):
                channel.send(dataclasses.replace(stats(), token=token))
            case MetricsReply() | RateLimitReply():
                calls.resolve(message)
            case DeskToClient() | DeskToOperator():
                desk.deliver(message)

    async def metrics_from_supervisor() -> bytes:
        try:
            reply: MetricsReply = await calls.call(MetricsRequest, SUPERVISOR_TIMEOUT)
        except (TimeoutError, ConnectionError) as exc:
            raise ServiceUnavailable(f"metrics unavailable: {exc or 'no answer'}") from None
        return reply.body

    state.metrics = metrics_from_supervisor
    await channel.attach()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.put_nowait, "SIGTERM")

    first = asyncio.ensure_future(stop.get())
    registry_wait = asyncio.ensure_future(has_registry.wait())
    await asyncio.wait({first, registry_wait}, return_when=asyncio.FIRST_COMPLETED)
    registry_wait.cancel()
    if first.done():
        await channel.close()
        return
    first.cancel()

    runner = AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        # aiohttp's default keeps idle clients (and slow header senders) for an hour.
        keepalive_timeout=spec.config.timeouts.keepalive,
        handler_cancellation=True,
        shutdown_timeout=spec.graceful_timeout,
    )
    await runner.setup()
    # A slot's socket is bound but not yet listening: this is where it starts to.
    site = web.SockSite(runner, spec.sock, backlog=BACKLOG)
    await site.start()
    server = runner.server
    assert server is not None
    trimming = asyncio.ensure_future(trim_after_bursts(lambda: len(server.connections)))
    settle_heap()
    channel.send(Ready(spec.worker_id, os.getpid()))
    reason = await stop.get()
    trimming.cancel()
    log.debug("worker %d stopping: %s", spec.worker_id, reason)
    await drain(runner, site, spec.sock, state, spec.graceful_timeout)
    # The app's cleanup passes on the last usage records (of requests that finished
    # during the drain); then the numbers go, as the last word.
    await runner.cleanup()
    channel.send(stats())
    await channel.close()


async def drain(
    runner: web.AppRunner,
    site: web.BaseSite,
    listening: socket.socket,
    state: ProxyState,
    graceful: float,
) -> None:
    """Retire without dropping a request: stop accepting (new connections go to the other
    workers, or are refused when all stop), answer every request that still arrives with
    `Connection: close`, and wait until the clients have gone, the requests in flight are
    done and quiet for IDLE_GRACE, or `graceful` runs out. runner.cleanup() then closes
    what is left."""
    state.draining = True
    await stop_accepting(runner, site, listening)
    await close_operator_sockets(state)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + graceful
    quiet_since: float | None = None
    server = runner.server
    while server is not None and server.connections and loop.time() < deadline:
        if state.active_requests:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = loop.time()
        elif loop.time() - quiet_since >= IDLE_GRACE:
            break
        await asyncio.sleep(0.05)
    # A request waiting for a person may wait far longer than any model: it does not
    # outlive the graceful timeout, its client gets an error (the operator is told) and
    # the connection closes: cleanup waits for those handlers to write their error.
    interrupted = state.operators.interrupt()
    if interrupted:
        log.warning(
            "graceful timeout (%g s) ran out: %d request(s) still waiting for an operator "
            "end with 503 operator_interrupted",
            graceful,
            interrupted,
        )


async def stop_accepting(
    runner: web.AppRunner, site: web.BaseSite, listening: socket.socket
) -> None:
    """Stop listening, then take in the connections already queued: when this worker
    held the socket's last copy (the worker count went down, or llproxy stops), closing
    it would reset them. Only one arriving in the instant of the close can still be."""
    queued = listening.dup()
    await site.stop()
    queued.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        for _ in range(BACKLOG):
            try:
                connection, _ = queued.accept()
            except OSError:  # nothing queued (BlockingIOError), or never listened
                break
            connection.setblocking(False)
            assert runner.server is not None
            try:
                await loop.connect_accepted_socket(runner.server, connection)
            except OSError:  # the client left meanwhile: not a reason to stop the drain
                connection.close()
    finally:
        queued.close()
