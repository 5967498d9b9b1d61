"""A real worker, started the way the supervisor starts one (multiprocessing spawn, a
`WorkerSpec`, its channel), that reports the modules it held once it had served and
retired. Run as `python -c "from tests.worker_probe import main; main()" CONFIG_JSON`
(so spawn re-runs no `__main__`): prints the worker's `sys.modules` as a JSON list.

This module imports nothing at its top that a worker would not: the spawned child
imports it to find `_serve_and_report`.
"""

from __future__ import annotations

import sys
from multiprocessing.connection import Connection
from typing import Any


def _serve_and_report(spec: Any, report: Connection) -> None:
    """The child: the real worker's main, then what it imported, to the parent."""
    from llproxy.process.worker import worker_main

    worker_main(spec)
    report.send(sorted(sys.modules))


def main() -> None:
    import asyncio
    import json
    import multiprocessing
    import os
    import signal
    import socket

    from llproxy.config import parse_config
    from llproxy.core.registry import Registry
    from llproxy.process.channel import Channel, Ready, RegistryUpdate, WorkerSpec
    from llproxy.stores import HostShare

    config = parse_config(json.loads(sys.argv[1]))
    context = multiprocessing.get_context("spawn")
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    ours, theirs = socket.socketpair()
    spec = WorkerSpec(0, config, listening, theirs, HostShare.create(context), 0, "text", 5.0)
    receive, report = context.Pipe(duplex=False)
    process = context.Process(target=_serve_and_report, args=(spec, report), daemon=True)
    process.start()
    theirs.close()
    report.close()

    async def supervise() -> None:
        ready = asyncio.Event()
        channel = Channel(ours, lambda message: isinstance(message, Ready) and ready.set())
        await channel.attach()
        channel.send(RegistryUpdate(Registry()))
        async with asyncio.timeout(30):
            await ready.wait()
        # Served: now retire it, as the supervisor does.
        os.kill(process.pid or 0, signal.SIGTERM)
        await channel.closed(30)

    asyncio.run(supervise())
    if not receive.poll(30):
        sys.exit("the worker did not report its modules")
    print(json.dumps(receive.recv()))
    process.join(30)
