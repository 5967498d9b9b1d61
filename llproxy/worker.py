"""A worker process: serves the shared listening socket with the llproxy app under uvloop.

It makes its event loop only after it started, takes registry snapshots from the
supervisor instead of scanning, starts serving once it has the first one, and on SIGTERM
(or when the supervisor vanishes) stops accepting and lets requests finish until the
graceful deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import uvloop
from aiohttp import web

from .app import STATE, create_app
from .channel import (
    Channel,
    Ready,
    RegistryUpdate,
    StatsReply,
    StatsRequest,
    WorkerCount,
    WorkerSpec,
)
from .logs import setup_logging

log = logging.getLogger("llproxy.worker")

# aiohttp's AppRunner default keeps idle clients for an hour; a proxy wants the norm.
KEEPALIVE_TIMEOUT = 75.0


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

    def on_message(message: Any) -> None:
        match message:
            case RegistryUpdate(registry):
                state.set_registry(registry)
                has_registry.set()
            case WorkerCount(workers):
                state.workers = workers
            case StatsRequest(token):
                channel.send(StatsReply(token, spec.worker_id, os.getpid(), state.stats.snapshot()))

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
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        handler_cancellation=True,
        shutdown_timeout=spec.graceful_timeout,
    )
    await runner.setup()
    await web.SockSite(runner, spec.sock).start()
    channel.send(Ready(spec.worker_id, os.getpid()))
    reason = await stop.get()
    log.debug("worker %d stopping: %s", spec.worker_id, reason)
    await runner.cleanup()
    channel.detach()
