"""`scripts/rss.py`: what an llproxy worker holds in memory, idle and after idle connections.

Starts the fast fake upstream and `llproxy serve --workers 2` with bench.py's kind of
config, then reads each worker's RSS 2 s after it serves (bench.py's `idle_rss`). With
--rounds it then opens --connections keep-alive connections to llproxy (127.0.0.1 only),
sends one small chat request on each, holds them --hold seconds, closes them, waits
--settle seconds and reads the workers' RSS again, round after round: memory a closed
connection does not give back shows as RSS that stays up, or grows round by round. The
file limit is raised here (and so for what this starts). Prints a line per reading (MB,
one figure per worker); every process started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import PYTHON, ROOT, Processes, free_port, rss_mb, wait_listening, workers_of
from capacity import raise_file_limit

REQUEST = json.dumps(
    {"model": "bench-model", "messages": [{"role": "user", "content": "Say hello."}]}
).encode()


def config(upstream: int) -> dict[str, object]:
    return {
        "interval": 600000,
        "rate_limit": None,
        "endpoints": [{"hostname": "127.0.0.1", "port_start": upstream, "port_end": upstream}],
    }


def workers_rss(master: int) -> list[float]:
    return [round(rss_mb(pid), 1) for pid in workers_of(master)]


async def ask(port: int) -> tuple[asyncio.StreamWriter, bool] | None:
    """Connects and sends one request; returns the open connection and whether it got a
    200 (the answer read whole, so the connection is idle and kept alive)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(REQUEST), REQUEST)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await reader.readexactly(length)
        return writer, head.startswith(b"HTTP/1.1 200")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return writer, False


async def burst(port: int, connections: int, hold: float, master: int) -> tuple[int, list[float]]:
    """Opens `connections` keep-alive connections (one request answered on each), holds
    them `hold` s, reads the workers' RSS, closes them all; returns how many got a 200."""
    limit = asyncio.Semaphore(200)  # connecting at most this many at once
    opened = await asyncio.wait_for(
        asyncio.gather(*(_bounded(limit, port) for _ in range(connections))), 120
    )
    await asyncio.sleep(hold)
    held = workers_rss(master)
    for result in opened:
        if result is not None:
            result[0].close()
    await asyncio.sleep(0.1)
    return sum(1 for result in opened if result is not None and result[1]), held


async def _bounded(limit: asyncio.Semaphore, port: int) -> tuple[asyncio.StreamWriter, bool] | None:
    async with limit:
        return await ask(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--starts", type=int, default=3, help="daemon starts for idle RSS")
    parser.add_argument("--rounds", type=int, default=0, help="rounds of idle connections")
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--hold", type=float, default=3.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--script",
        action="store_true",
        help="start the installed `llproxy` script (as an operator does), not python -m llproxy",
    )
    args = parser.parse_args(argv)
    files = raise_file_limit()
    if args.rounds and files < args.connections + 200:
        sys.exit(f"the file limit ({files}) is below {args.connections} connections")
    workdir = Path(tempfile.mkdtemp(prefix="llproxy-rss-"))
    os.environ["LLPROXY_STATE_DIR"] = str(workdir / "state")
    # This checkout's llproxy, whichever one the venv has installed.
    os.environ["PYTHONPATH"] = str(ROOT)
    procs = Processes(workdir)
    try:
        upstream = free_port()
        procs.start(
            "upstream", [PYTHON, str(ROOT / "scripts/fast_upstream.py"), "--port", str(upstream)]
        )
        wait_listening(upstream)
        path = workdir / "llproxy.json"
        path.write_text(json.dumps(config(upstream)))
        command = (
            [str(Path(PYTHON).parent / "llproxy")] if args.script else [PYTHON, "-m", "llproxy"]
        )
        for start in range(args.starts):
            port = free_port()
            proc = procs.start(
                f"llproxy-{start}",
                [*command, "serve", "--config", str(path), "--bindport", str(port),
                 "--workers", str(args.workers)],
            )  # fmt: skip
            wait_listening(port)
            time.sleep(2)
            print(f"start {start + 1}: idle worker RSS {workers_rss(proc.pid)} MB", flush=True)
            if start == args.starts - 1:
                for round_ in range(args.rounds):
                    ok, held = asyncio.run(burst(port, args.connections, args.hold, proc.pid))
                    time.sleep(args.settle)
                    print(
                        f"round {round_ + 1}: {ok}/{args.connections} answered; "
                        f"RSS {held} MB held open, {workers_rss(proc.pid)} MB "
                        f"{args.settle:g} s after they closed",
                        flush=True,
                    )
            procs.stop(proc)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
