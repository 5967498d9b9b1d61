"""Instructions a proxied request costs, counted by valgrind's callgrind: a figure that,
unlike requests/s or CPU time, does not move with the machine's other work (runs of the
same code agree within about 2 %), for before/after comparisons on a shared machine.

llproxy's app is served alone in one process (as `serve_alone` builds it, the workers'
collector settings applied) under callgrind with counting off; `scripts/fast_upstream.py`
answers outside it. A warm-up of --warmup requests, then counting on for exactly
--requests requests over 32 keep-alive connections, then off: the instructions counted
over the requests. `--paced` streams with the chunks apart (a read each, the cost a chunk
at a model's pace). `--floor` counts `scripts/floor_proxy.py`'s handler instead (one
process), the least a proxy of this design costs. `--chunks N` sets the upstream's
chunks a stream: two counts' difference over their chunks is what one chunk costs, apart
from what a stream costs once. `--dialect anthropic` sends the same
chat to the Anthropic face (`POST /v1/messages`); `--rate-limit off` serves with no limit
(the default limit is too high to refuse, so its cost is counted). Needs valgrind
(`apt-get install valgrind`); everything stays on 127.0.0.1 and every process started is
stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import PYTHON, ROOT, Processes, free_port, wait_listening

CONNECTIONS = 32
# --paced: the upstream sends a stream's chunks PACE_MS apart, few streams at once, so
# that even under callgrind (tens of times slower) each chunk is a read of its own, as at
# a model's pace: the cost a chunk, which limits how many streams a worker carries.
PACE_MS = 20.0
PACED_CONNECTIONS = 4
SERVE_ALONE = """
import asyncio, json, sys
import uvloop
from aiohttp import web
from llproxy.config import parse_config
from llproxy.server.app import serve_alone
from llproxy.server.http import AppRunner

async def main() -> None:
    config = parse_config(json.loads(sys.argv[1]), environ={})
    runner = AppRunner(serve_alone(config), handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[2])).start()
    await asyncio.sleep(1)  # the first scan
    try:  # as a worker does; commits before 2026-12-04 had no settle_heap
        from llproxy.process.memory import settle_heap
    except ImportError:
        pass
    else:
        settle_heap()
    await asyncio.Event().wait()

uvloop.run(main())
"""


# The client's dialect: its path, and what its request adds to the chat.
DIALECTS = {
    "openai": ("/v1/chat/completions", "", {}),
    "anthropic": ("/v1/messages", "anthropic-version: 2023-06-01\r\n", {"max_tokens": 256}),
}


async def drive(
    port: int,
    requests: int,
    stream: bool,
    connections: int = CONNECTIONS,
    dialect: str = "openai",
) -> None:
    """Exactly `requests` chat requests over `connections` keep-alive connections."""
    path, header, extra = DIALECTS[dialect]
    body = json.dumps(
        {
            "model": "bench-model:fast",
            "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
            **extra,
        }
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    left = requests

    async def connection() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while left > 0:
            left -= 1
            writer.write(head + body)
            answer = await reader.readuntil(b"\r\n\r\n")
            if not answer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"not answered: {answer[:200]!r}")
            if b"chunked" in answer.lower():
                while size := int((await reader.readline()).strip(), 16):
                    await reader.readexactly(size + 2)
                await reader.readexactly(2)
            else:
                fields = dict(
                    line.split(b":", 1) for line in answer.split(b"\r\n")[1:] if b":" in line
                )
                length = next(v for k, v in fields.items() if k.lower() == b"content-length")
                await reader.readexactly(int(length))
        writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))


def count(args: argparse.Namespace, stream: bool) -> float:
    workdir = Path(tempfile.mkdtemp(prefix="llproxy-instructions-"))
    procs = Processes(workdir)
    try:
        upstream, port = free_port(), free_port()
        command = [PYTHON, str(ROOT / "scripts/fast_upstream.py"), "--port", str(upstream)]
        if args.paced:
            command += ["--delay", "--first-ms", str(PACE_MS), "--gap-ms", str(PACE_MS)]
        command += ["--chunks", str(args.chunks)]
        procs.start("upstream", command)
        wait_listening(upstream)
        if args.floor:
            floor = f"from floor_proxy import process; process({port}, {upstream})"
            served = ["-c", f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); {floor}"]
        else:
            config = {
                "interval": 600000,
                "rate_limit": None if args.rate_limit == "off" else args.rate_limit,
                "state_dir": str(workdir / "state"),
                "endpoints": [{"hostname": "127.0.0.1", "port_start": upstream, "tags": ["fast"]}],
            }
            served = ["-c", SERVE_ALONE, json.dumps(config), str(port)]
        out = workdir / "callgrind.out"
        proc = procs.start(
            "counted",
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}.%p",
                PYTHON,
                *served,
            ],
        )
        wait_listening(port, timeout=240)
        time.sleep(3)
        connections = PACED_CONNECTIONS if args.paced else CONNECTIONS
        asyncio.run(drive(port, args.warmup, stream, connections, args.dialect))
        control = shutil.which("callgrind_control") or "callgrind_control"
        target = str(proc.pid)
        subprocess.run([control, "-i", "on", target], check=True, capture_output=True)
        asyncio.run(drive(port, args.requests, stream, connections, args.dialect))
        subprocess.run([control, "-i", "off", target], check=True, capture_output=True)
        subprocess.run([control, "-d", target], check=True, capture_output=True)
        procs.stop(proc)  # callgrind writes its last file as it ends
        total = 0
        for dump in workdir.glob("callgrind.out.*"):
            # A dump's count is its last line, `totals:` (its `summary:` at the top is 0).
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    total += int(line.split()[1])
        return total / int(args.requests)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, help="counted (default 1,000; paced 200)")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3, help="each mode's runs (median)")
    parser.add_argument("--floor", action="store_true", help="scripts/floor_proxy.py instead")
    parser.add_argument("--rate-limit", default="1000000000 per 15 minutes", help="a limit, or off")
    parser.add_argument(
        "--chunks",
        type=int,
        default=20,
        help="the upstream's token chunks a stream (two counts' difference: a chunk's cost)",
    )
    parser.add_argument("--mode", choices=("json", "stream", "both"), default="both")
    parser.add_argument(
        "--dialect", choices=sorted(DIALECTS), default="openai", help="the client's dialect"
    )
    parser.add_argument(
        "--paced",
        action="store_true",
        help=f"the stream only, its chunks {PACE_MS:g} ms apart (a read each); "
        "--requests defaults to 200",
    )
    args = parser.parse_args()
    if args.requests is None:
        args.requests = 200 if args.paced else 1000
    if args.paced:
        args.mode = "stream"
        args.warmup = min(args.warmup, 40)
    if args.floor and args.dialect != "openai":
        parser.error("the floor serves OpenAI's chat completions only")
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install valgrind")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    for mode in ("json", "stream") if args.mode == "both" else (args.mode,):
        runs = sorted(count(args, mode == "stream") for _ in range(args.runs))
        median = runs[len(runs) // 2]
        spread = ", ".join(f"{r / 1000:,.0f}k" for r in runs)
        name = "floor" if args.floor else "llproxy"
        name += (" anthropic" if args.dialect == "anthropic" else "") + (
            " paced" if args.paced else ""
        )
        print(f"{name} {mode}: {median / 1000:,.0f}k instructions a request (runs: {spread})")


if __name__ == "__main__":
    main()
