"""Running the app: `run(config)` serves until a signal asks it to stop.

Signal handlers only put the signal on a queue; one dispatcher loop handles them, so a
console command can later share the very same shutdown path.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop
from aiohttp import web

from .app import create_app
from .config import Config

log = logging.getLogger("llproxy.server")

# aiohttp's AppRunner default keeps idle clients for an hour; a proxy wants the norm.
KEEPALIVE_TIMEOUT = 75.0
GRACEFUL_TIMEOUT = 30.0


async def serve(config: Config, graceful_timeout: float = GRACEFUL_TIMEOUT) -> None:
    app = create_app(config)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        handler_cancellation=True,
        shutdown_timeout=graceful_timeout,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.bindip, config.port, backlog=1024)
    await site.start()
    log.info(
        "llproxy serving on http://%s:%d (config: %s)",
        config.bindip,
        config.port,
        config.source,
        extra={"event": "ready", "bindip": config.bindip, "port": config.port},
    )

    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    try:
        sig = await signals.get()
        log.info("received %s, shutting down", sig.name)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def run(config: Config, graceful_timeout: float = GRACEFUL_TIMEOUT) -> None:
    uvloop.run(serve(config, graceful_timeout))
