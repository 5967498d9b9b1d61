"""A worker process: serves the shared listening socket with the llproxy app under uvloop.

It makes its event loop only after it started, takes registry snapshots from the
supervisor instead of scanning, starts serving once it has the first one, and on SIGTERM
(or when the supervisor vanishes) stops accepting and lets requests finish until the
graceful deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import signal
from typing import Any

import uvloop
from aiohttp import web

from .app import STATE, create_app
from .channel import (
    Channel,
    MetricsReply,
    MetricsRequest,
    Ready,
    RegistryUpdate,
    StatsReply,
    StatsRequest,
    WorkerCount,
    WorkerSpec,
)
from .errors import ProxyError
from .logs import setup_logging

log = logging.getLogger("llproxy.worker")

METRICS_TIMEOUT = 5.0


class MetricsUnavailable(ProxyError):
    status = 503
    code = "metrics_unavailable"


def worker_main(spec: WorkerSpec) -> None:
    # Ctrl-C at a terminal signals the whole process group; the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(spec.verbose, spec.log_format)
    uvloop.run(serve(spec))


async def serve(spec: WorkerSpec) -> None:
    app = create_app(spec.config, discover=False, worker_id=spec.worker_id)
    state = app[STATE]
    stop: asyncio.Queue[str] = asyncio.Queue()
    has_registry = asyncio.Event()
    metrics_waiters: dict[int, asyncio.Future[bytes]] = {}
    tokens = itertools.count(1)

    def stats() -> StatsReply:
        return StatsReply(0, spec.worker_id, os.getpid(), state.telemetry)

    def on_message(message: Any) -> None:
        match message:
            case RegistryUpdate(registry):
                state.set_registry(registry)
                has_registry.set()
            case WorkerCount(workers):
                state.workers = workers
            case StatsRequest(token):
                channel.send(dataclasses.replace(stats(), token=token))
            case MetricsReply(token, body):
                waiter = metrics_waiters.pop(token, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(body)

    async def metrics_from_supervisor() -> bytes:
        token = next(tokens)
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        metrics_waiters[token] = waiter
        try:
            if not channel.send(MetricsRequest(token)):
                raise MetricsUnavailable("the supervisor is gone")
            async with asyncio.timeout(METRICS_TIMEOUT):
                return await waiter
        except TimeoutError:
            raise MetricsUnavailable("the supervisor did not answer in time") from None
        finally:
            metrics_waiters.pop(token, None)

    state.metrics_source = metrics_from_supervisor

    channel = Channel(spec.conn, on_message, lambda: stop.put_nowait("supervisor gone"))
    channel.attach()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.put_nowait, "SIGTERM")

    first = asyncio.ensure_future(stop.get())
    registry_wait = asyncio.ensure_future(has_registry.wait())
    await asyncio.wait({first, registry_wait}, return_when=asyncio.FIRST_COMPLETED)
    registry_wait.cancel()
    if first.done():
        channel.detach()
        return
    first.cancel()

    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        # aiohttp's default keeps idle clients (and slow header senders) for an hour.
        keepalive_timeout=spec.config.timeouts.keepalive,
        handler_cancellation=True,
        shutdown_timeout=spec.graceful_timeout,
    )
    await runner.setup()
    await web.SockSite(runner, spec.sock).start()
    channel.send(Ready(spec.worker_id, os.getpid()))
    reason = await stop.get()
    log.debug("worker %d stopping: %s", spec.worker_id, reason)
    await runner.cleanup()
    channel.send(stats())  # the final numbers, so the daemon's counters keep them
    channel.detach()
