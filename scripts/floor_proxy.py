"""The floor of the benchmark: the least a proxy built like llproxy can cost.

aiohttp's low-level server under uvloop, in N processes sharing one port (SO_REUSEPORT,
as llproxy's workers do), each passing `POST /v1/chat/completions` to one upstream through
llproxy's own HTTP client (`backends/openai_http/transport.py`) and back: the whole answer,
or a stream's bytes as they come. Nothing else: no key, limit, translation, routing,
check, record or header of llproxy's. What llproxy adds to this is the price of its
features; what this costs against nginx is the price of Python, aiohttp and the design.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import sys

import uvloop
from aiohttp import web

from llproxy.backends.openai_http.transport import UpstreamPool
from llproxy.core.registry import Upstream


async def serve(port: int, upstream_port: int) -> None:
    upstream = Upstream(
        base_url=f"http://127.0.0.1:{upstream_port}/v1", hostname="127.0.0.1", port=upstream_port
    )
    pool = UpstreamPool(connect_timeout=5.0, keepalive=4.0)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        answer = await pool.post(upstream, "chat/completions", body)
        if answer.content_type != "text/event-stream":
            data = await answer.read()
            answer.release()
            return web.Response(body=data, content_type=answer.content_type)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while chunk := await answer.chunk():
            await response.write(chunk)
        answer.release()
        await response.write_eof()
        return response

    server = web.Server(handler)
    loop = asyncio.get_running_loop()
    await loop.create_server(server, "127.0.0.1", port, reuse_port=True, backlog=4096)
    await asyncio.Event().wait()


def process(port: int, upstream_port: int) -> None:
    uvloop.run(serve(port, upstream_port))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", type=int, required=True, help="the upstream's port")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    # Stopped by SIGTERM too: the exit ends the (daemonic) processes with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=process, args=(args.port, args.upstream), daemon=True)
        for _ in range(args.processes)
    ]
    for child in children:
        child.start()
    print(f"floor proxy on 127.0.0.1:{args.port}, {args.processes} processes", flush=True)
    try:
        for child in children:
            child.join()
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            child.terminate()


if __name__ == "__main__":
    main()
