"""`make bench`: llproxy against a direct connection and nginx, under the same load, in one run.

Every figure is the median of --reps repetitions and is also given as a ratio to the
direct and nginx figures of the same repetition, because this machine is shared and
noisy. Load stays on 127.0.0.1; every run is bounded in time; every process started here
is stopped by PID at the end. Writes a table to the terminal and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Counted on every request like the default limit, never reached in a run.
LIMIT_NEVER_REACHED = "1000000000 per 15 minutes"
FLOOR = "aiohttp-floor"  # scripts/floor_proxy.py
PYTHON = sys.executable
CHAT_PATH = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Say hello."}]
ANTHROPIC_MODEL = "claude-bench"  # the model of the managed Anthropic endpoint
# A stream asked for in another dialect, through the same llproxy as the OpenAI stream:
# name → (path, body, model). Without a model of its own it is the OpenAI stream's, from
# the same upstream (what translating a stream costs); `{model}` in a path is that model,
# and such a body is sent as it is (Gemini names the model and the stream in the URL).
# With ANTHROPIC_MODEL, an Anthropic client meets an Anthropic back-end: passed on as is.
DIALECT_STREAMS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "anthropic": ("/v1/messages", {"max_tokens": 256, "messages": HELLO}, None),
    "responses": ("/v1/responses", {"input": "Say hello."}, None),
    "ollama": ("/api/chat", {"messages": HELLO}, None),
    "gemini": (
        "/v1beta/models/{model}:streamGenerateContent?alt=sse",
        {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
        None,
    ),
    "anthropic-passthrough": (
        "/v1/messages",
        {"max_tokens": 256, "messages": HELLO},
        ANTHROPIC_MODEL,
    ),
}
# Records written by hand, kept by a full run: the JSON path's before/after runs, worker
# memory (scripts/rss.py), the stream relay's cost a chunk, instructions a request
# (scripts/instructions.py) (issue 20).
KEPT_SECTIONS = [
    re.compile(rf"<!-- {name} -->.*<!-- /{name} -->", re.S)
    for name in ("hotpath", "rss", "relay2", "instructions", "remaining")
]
# `--only dialects` writes its figures here in BENCHMARKS.md; a full run, which has them
# among its own, drops the section.
DIALECTS_SECTION = re.compile(r"\n?<!-- dialects -->.*<!-- /dialects -->\n?", re.S)
MENDING_SECTION = re.compile(r"\n?<!-- mending -->.*<!-- /mending -->\n?", re.S)
# The OpenAI stream as an agent asks for it: a tool offered, so every mending stage
# (tool calls, thinking, loops; core/mend) reads the answer when they are on.
AGENT_CHAT = {
    "messages": HELLO,
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ],
}
MENDING_OFF = {"tool_calls": False, "thinking": False, "loops": False}


# --- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


class Processes:
    """Everything this run starts, stopped by PID at the end whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)


def start_floor(
    procs: Processes, upstream: int, processes: int
) -> tuple[int, subprocess.Popen[bytes]]:
    """scripts/floor_proxy.py in front of the upstream's port: its port and its master."""
    port = free_port()
    floor = [PYTHON, str(ROOT / "scripts/floor_proxy.py"), "--port", str(port)]
    floor += ["--upstream", str(upstream), "--processes", str(processes)]
    return port, procs.start("floor", floor)


def workers_of(pid: int) -> list[int]:
    """Worker processes of an llproxy master (not multiprocessing's resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
                if int(fields[1]) == pid and b"spawn_main" in cmdline:
                    found.append(int(entry.name))
    return sorted(found)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of an llproxy master's workers so far."""
    total = 0
    for worker in workers_of(pid):
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- wrk ------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"bad latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(url: str, lua: Path, connections: int, seconds: float) -> WrkResult:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(lua),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    for pattern in (
        r"Non-2xx or 3xx responses: (\d+)",
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
    ):
        match = re.search(pattern, out)
        if match:
            errors += sum(int(g) for g in match.groups())
    return WrkResult(rps, p50, p99, total, errors)


def lua_script(
    path: Path, model: str | None, stream: bool, fields: dict[str, Any] | None = None
) -> Path:
    """A POST of `fields` (a chat by default) with the model and stream flag, or without
    them when `model` is None (a route that takes them from its URL)."""
    named = {} if model is None else {"model": model, "stream": stream}
    body = json.dumps({**named, **(fields or {"messages": HELLO})})
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return path


# --- streaming timing (time to first byte, gaps between chunks) ------------------------------


async def _timed_stream(port: int, model: str) -> tuple[float, list[float]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    ).encode()
    started = time.perf_counter()
    writer.write(
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    arrivals: list[float] = []
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), 30)
        now = time.perf_counter()
        arrivals.extend(now for _ in range(chunk.count(b"data: {")))
        if not chunk or b"data: [DONE]" in chunk:
            break
    writer.close()
    ttfb = (arrivals[0] - started) * 1000
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    return ttfb, gaps


def stream_timing(port: int, model: str, count: int) -> tuple[float, float, float]:
    """Median time to first chunk, median and max gap between chunks (ms)."""

    async def run() -> list[tuple[float, list[float]]]:
        return [await _timed_stream(port, model) for _ in range(count)]

    results = asyncio.run(run())
    gaps = [g for _, each in results for g in each]
    return statistics.median(r[0] for r in results), statistics.median(gaps), max(gaps)


def scan_seconds() -> float:
    sys.path.insert(0, str(ROOT))
    from llproxy.backends.openai_http.discovery import make_scan_session, scan
    from llproxy.config import parse_config

    config = parse_config(
        {"endpoints": [{"hostname": "127.0.0.1", "port_start": 20000, "port_end": 24095}]}
    )

    async def once() -> float:
        async with make_scan_session(config) as session:
            result = await scan(config, session)
        assert result.probed == 4096
        return result.duration_ms / 1000

    import uvloop

    return uvloop.run(once())


# --- the run --------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    procs: Processes
    results: dict[str, list[Any]] = field(default_factory=dict)

    def record(self, key: str, value: Any) -> None:
        self.results.setdefault(key, []).append(value)


def ensure_tools() -> None:
    missing = [
        pkg for tool, pkg in (("wrk", "wrk"), ("nginx", "nginx-light")) if not shutil.which(tool)
    ]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"bench needs {', '.join(missing)}: sudo apt-get install {' '.join(missing)}")
    print(f"installing {' '.join(missing)} …", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *missing],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


def nginx_conf(workdir: Path, routes: list[tuple[int, int]], connections: int = 8192) -> Path:
    servers = "\n".join(
        f"""  upstream up{listen} {{ server 127.0.0.1:{target}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{listen};
    location / {{
      proxy_pass http://up{listen};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}"""
        for listen, target in routes
    )
    path = workdir / "nginx.conf"
    path.write_text(
        f"""worker_processes auto;
worker_rlimit_nofile {connections};
error_log {workdir}/nginx-error.log warn;
pid {workdir}/nginx.pid;
events {{ worker_connections {connections}; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/nginx-body;
  proxy_temp_path {workdir}/nginx-proxy;
{servers}
}}
"""
    )
    return path


def versions() -> dict[str, str]:
    def first_line(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10)
            return (done.stdout or done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    import aiohttp
    import httptools
    import uvloop

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": f"{cpu} x {os.cpu_count()}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "httptools": httptools.__version__,
        "uvloop": uvloop.__version__,
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "--version"]),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    ensure_tools()
    workdir = Path(tempfile.mkdtemp(prefix="llproxy-bench-"))
    procs = Processes(workdir)
    bench = Bench(args, workdir, procs)
    cores = os.cpu_count() or 1
    only_dialects = args.only == "dialects"
    try:
        fast, slow, anthropic = free_port(), free_port(), free_port()
        upstream = [PYTHON, str(ROOT / "scripts/fast_upstream.py"), "--chunks", "20"]
        procs.start("upstream-fast", [*upstream, "--port", str(fast)])
        procs.start("upstream-anthropic", [*upstream, "--port", str(anthropic), "--anthropic"])
        procs.start(
            "upstream-slow",
            [
                PYTHON,
                str(ROOT / "scripts/fast_upstream.py"),
                "--port",
                str(slow),
                "--chunks",
                "20",
                "--delay",
                "--first-ms",
                "100",
                "--gap-ms",
                "10",
            ],
        )
        # The least a proxy built like llproxy costs (scripts/floor_proxy.py), as many
        # processes as llproxy has workers: what of the gap to nginx is llproxy's own.
        floor, _ = start_floor(procs, fast, cores)
        nginx_fast, nginx_slow = free_port(), free_port()
        conf = nginx_conf(workdir, [(nginx_fast, fast), (nginx_slow, slow)])
        procs.start("nginx", ["nginx", "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"])
        config = workdir / "llproxy.json"
        config.write_text(
            json.dumps(
                {
                    "interval": 600000,
                    "rate_limit": None,  # the runs measure proxying, not limiting
                    "endpoints": [
                        {
                            "hostname": "127.0.0.1",
                            "port_start": fast,
                            "port_end": fast,
                            "tags": ["fast"],
                        },
                        {
                            "hostname": "127.0.0.1",
                            "port_start": slow,
                            "port_end": slow,
                            "tags": ["slow"],
                        },
                        {
                            "url": f"http://127.0.0.1:{anthropic}",
                            "dialect": "anthropic",
                            "apikey": "sk-ant-bench",
                            "models": [ANTHROPIC_MODEL],
                        },
                    ],
                }
            )
        )
        # The same, with a rate limit on that is too high to refuse: what limiting costs.
        limited_config = workdir / "llproxy-limited.json"
        limited_config.write_text(
            json.dumps({**json.loads(config.read_text()), "rate_limit": LIMIT_NEVER_REACHED})
        )
        # The same with every mending stage off: what they cost on the OpenAI stream.
        plain_config = workdir / "llproxy-plain.json"
        plain_body = {**json.loads(config.read_text()), "repair": MENDING_OFF}
        plain_config.write_text(json.dumps(plain_body))
        # Usage records of the load go to this run's directory, not the user's state.
        os.environ["LLPROXY_STATE_DIR"] = str(workdir / "state")

        def start_llproxy(name: str, workers: int, config: Path) -> tuple[int, Any]:
            port = free_port()
            proc = procs.start(
                name,
                [
                    PYTHON,
                    "-m",
                    "llproxy",
                    "serve",
                    "--config",
                    str(config),
                    "--bindport",
                    str(port),
                    "--workers",
                    str(workers),
                ],
            )
            return port, proc

        # `--only dialects` starts them all too (idle, they cost nothing measurable).
        llproxies = {
            workers: start_llproxy(f"llproxy-{workers}", workers, config)
            for workers in sorted({1, cores})
        }
        limited_port, _ = start_llproxy(f"llproxy-{cores}-limited", cores, limited_config)
        plain_port, plain_proc = start_llproxy(f"llproxy-{cores}-plain", cores, plain_config)
        for port in (
            plain_port,
            floor,
            fast,
            slow,
            anthropic,
            nginx_fast,
            nginx_slow,
            limited_port,
            *(p for p, _ in llproxies.values()),
        ):
            wait_listening(port)
        time.sleep(2)  # workers become ready after the first scan

        idle_rss = {
            w: [rss_mb(pid) for pid in workers_of(proc.pid)] for w, (_, proc) in llproxies.items()
        }

        targets = {
            "direct": (fast, "bench-model"),
            "nginx": (nginx_fast, "bench-model"),
            FLOOR: (floor, "bench-model"),
        }
        for workers, (port, _) in llproxies.items():
            targets[f"llproxy-{workers}w"] = (port, "bench-model:fast")
        targets[f"llproxy-{cores}w+limit"] = (limited_port, "bench-model:fast")
        scripts = {
            (name, stream): lua_script(workdir / f"{name}-{stream}.lua", model, stream)
            for name, (_, model) in targets.items()
            for stream in (False, True)
        }
        top_port, top_model = targets[f"llproxy-{cores}w"]

        def compare_dialects() -> None:
            # The dialects between two runs of the OpenAI stream, measured right before
            # and after them: minutes apart from the grid's, its figure drifted with the
            # machine (ratios from 0.61 to 1.06 in two runs of the same code).
            openai_stream = scripts[(f"llproxy-{cores}w", True)]
            url = f"http://127.0.0.1:{top_port}{CHAT_PATH}"
            bench.record(
                f"llproxy-{cores}w|openai-stream|before", wrk(url, openai_stream, 32, args.duration)
            )
            for dialect, (path, fields, own_model) in DIALECT_STREAMS.items():
                model = own_model or top_model
                lua = workdir / f"{dialect}.lua"
                if "{model}" in path:
                    path, lua = path.format(model=model), lua_script(lua, None, True, fields)
                else:
                    lua = lua_script(lua, model, True, fields)
                result = wrk(f"http://127.0.0.1:{top_port}{path}", lua, 32, args.duration)
                bench.record(f"llproxy-{cores}w|{dialect}-stream|32", result)
            bench.record(
                f"llproxy-{cores}w|openai-stream|after", wrk(url, openai_stream, 32, args.duration)
            )

        def compare_mending() -> None:
            # Stages off, on, off again, bracketed as the dialects are: the same stream
            # and request (a tool offered) through two llproxies differing only in them.
            # Also the workers' CPU per request: steadier than requests/s on a shared
            # machine, whose other work slows both alike.
            lua = lua_script(workdir / "agent.lua", top_model, True, AGENT_CHAT)
            key = f"llproxy-{cores}w"
            runs = (
                ("mending-off|before", plain_port, plain_proc),
                ("mending-on|32", top_port, llproxies[cores][1]),
                ("mending-off|after", plain_port, plain_proc),
            )
            for label, port, proc in runs:
                spent = cpu_seconds(proc.pid)
                result = wrk(f"http://127.0.0.1:{port}{CHAT_PATH}", lua, 32, args.duration)
                spent = cpu_seconds(proc.pid) - spent
                bench.record(f"{key}|{label}", result)
                bench.record(f"{key}|{label}|cpu", spent / max(result.requests, 1) * 1e6)

        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}", flush=True)
            if only_dialects:
                compare_dialects()
                continue
            if args.only == "mending":
                compare_mending()
                continue
            for stream in (False, True):
                for conns in (32, 128):
                    for name, (port, _) in targets.items():
                        result = wrk(
                            f"http://127.0.0.1:{port}{CHAT_PATH}",
                            scripts[(name, stream)],
                            conns,
                            args.duration,
                        )
                        bench.record(f"{name}|{'stream' if stream else 'json'}|{conns}", result)
                    # Limits off once more, after limits on: a comparison with the mean
                    # of the runs on either side cannot favour the one measured first.
                    result = wrk(
                        f"http://127.0.0.1:{top_port}{CHAT_PATH}",
                        scripts[(f"llproxy-{cores}w", stream)],
                        conns,
                        args.duration,
                    )
                    kind = "stream" if stream else "json"
                    bench.record(f"llproxy-{cores}w|{kind}|{conns}|again", result)
            compare_dialects()
            compare_mending()
            for name, (port, _) in targets.items():
                bench.record(
                    f"{name}|json|1",
                    wrk(
                        f"http://127.0.0.1:{port}{CHAT_PATH}",
                        scripts[(name, False)],
                        1,
                        args.duration,
                    ),
                )
            slow_targets = {"direct": (slow, "bench-model"), "nginx": (nginx_slow, "bench-model")}
            for workers, (port, _) in llproxies.items():
                slow_targets[f"llproxy-{workers}w"] = (port, "bench-model:slow")
            for name, (port, model) in slow_targets.items():
                bench.record(f"{name}|ttfb", stream_timing(port, model, args.stream_samples))
            bench.record("scan", scan_seconds())

        loaded_rss = {
            w: [rss_mb(pid) for pid in workers_of(proc.pid)] for w, (_, proc) in llproxies.items()
        }
        soak = None
        if args.soak_requests and not only_dialects and args.only != "mending":
            port, proc = llproxies[cores]
            before = [rss_mb(pid) for pid in workers_of(proc.pid)]
            print(
                f"soak: {args.soak_requests} requests, at most {args.soak_max_seconds:.0f} s",
                flush=True,
            )
            # wrk runs for a time, not a count: rounds until the count is reached or the
            # time is up, each round sized by the rate measured so far.
            rate = statistics.median(r.rps for r in bench.results[f"llproxy-{cores}w|json|32"])
            requests = errors = 0
            started = time.monotonic()
            while requests < args.soak_requests:
                left = args.soak_max_seconds - (time.monotonic() - started)
                if left < 1:
                    break
                seconds = min(left, max(2.0, (args.soak_requests - requests) / max(rate, 1)))
                result = wrk(
                    f"http://127.0.0.1:{port}{CHAT_PATH}",
                    scripts[(f"llproxy-{cores}w", False)],
                    32,
                    seconds,
                )
                requests, errors = requests + result.requests, errors + result.errors
                rate = result.rps
            after = [rss_mb(pid) for pid in workers_of(proc.pid)]
            soak = {
                "requests": requests,
                "errors": errors,
                "seconds": time.monotonic() - started,
                "rss_before": before,
                "rss_after": after,
            }
        return {
            "results": bench.results,
            "idle_rss": idle_rss,
            "loaded_rss": loaded_rss,
            "soak": soak,
            "cores": cores,
            "versions": versions(),
            "args": vars(args),
        }
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


# --- report -----------------------------------------------------------------------------------


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True) if y)


def bracket(before: list[Any], after: list[Any]) -> list[float]:
    """Per repetition, the mean requests/s of the runs just before and just after."""
    return [(b.rps + a.rps) / 2 for b, a in zip(before, after, strict=True)]


def dialect_verdicts(results: dict[str, list[Any]], top: str) -> list[str]:
    """Each dialect stream's requests/s as a ratio of the OpenAI stream's around it."""
    openai_stream = bracket(
        results[f"{top}|openai-stream|before"], results[f"{top}|openai-stream|after"]
    )
    verdicts = []
    for dialect in DIALECT_STREAMS:
        translated = [r.rps for r in results[f"{top}|{dialect}-stream|32"]]
        ratios = [x / y for x, y in zip(translated, openai_stream, strict=True) if y]
        spread = f" (runs: {min(ratios):.2f}x to {max(ratios):.2f}x)" if len(ratios) > 1 else ""
        verdicts.append(
            f"{top} {dialect} stream c32: {statistics.median(translated):,.0f} req/s, "
            f"{statistics.median(ratios):.2f}x the OpenAI stream{spread} (target ≥ 0.75x)"
        )
    return verdicts


def mending_verdict(results: dict[str, list[Any]], top: str) -> str:
    """The stream with every mending stage on, as a ratio of the runs with them off just
    before and after it."""
    off = bracket(results[f"{top}|mending-off|before"], results[f"{top}|mending-off|after"])
    on = [r.rps for r in results[f"{top}|mending-on|32"]]
    ratios = [x / y for x, y in zip(on, off, strict=True) if y]
    spread = f" (runs: {min(ratios):.2f}x to {max(ratios):.2f}x)" if len(ratios) > 1 else ""
    cpu_on = results[f"{top}|mending-on|32|cpu"]
    cpu_off = [
        (b + a) / 2
        for b, a in zip(
            results[f"{top}|mending-off|before|cpu"],
            results[f"{top}|mending-off|after|cpu"],
            strict=True,
        )
    ]
    return (
        f"{top} OpenAI stream c32, a tool offered, tool-call repair, thinking and loop "
        f"detection on: {statistics.median(on):,.0f} req/s, {statistics.median(ratios):.2f}x "
        f"of them off{spread} (target ≥ 0.90x); worker CPU per request "
        f"{statistics.median(cpu_on):.0f} µs on, {statistics.median(cpu_off):.0f} µs off "
        f"({median_ratio(cpu_off, cpu_on):.2f}x)"
    )


def report(data: dict[str, Any]) -> tuple[list[list[str]], list[list[str]], list[str]]:
    results: dict[str, list[Any]] = data["results"]
    cores = data["cores"]
    timed = ["direct", "nginx"] + [f"llproxy-{w}w" for w in sorted({1, cores})]
    names = [*timed[:2], FLOOR, *timed[2:], f"llproxy-{cores}w+limit"]
    rows = [
        [
            "figure",
            *names,
            *(f"{n} ÷ nginx" for n in names[2:]),
            *(f"{n} ÷ direct" for n in names[2:]),
        ]
    ]

    def line(label: str, key: str, pick: str, fmt: str) -> None:
        series = {n: [getattr(r, pick) for r in results[f"{n}|{key}"]] for n in names}
        rows.append(
            [
                label,
                *(format(statistics.median(series[n]), fmt) for n in names),
                *(f"{median_ratio(series[n], series['nginx']):.2f}x" for n in names[2:]),
                *(f"{median_ratio(series[n], series['direct']):.2f}x" for n in names[2:]),
            ]
        )

    for stream in ("json", "stream"):
        for conns in (32, 128):
            line(f"req/s {stream} c{conns}", f"{stream}|{conns}", "rps", ",.0f")
            line(f"p50 ms {stream} c{conns}", f"{stream}|{conns}", "p50_ms", ".2f")
            line(f"p99 ms {stream} c{conns}", f"{stream}|{conns}", "p99_ms", ".2f")
    line("p50 ms c1 (sequential)", "json|1", "p50_ms", ".3f")

    verdicts = []
    direct_c1 = [r.p50_ms for r in results["direct|json|1"]]
    for n in names[2:]:
        added = statistics.median(
            r.p50_ms - d for r, d in zip(results[f"{n}|json|1"], direct_c1, strict=True)
        )
        verdicts.append(f"{n}: latency added at c1, p50: {added:.3f} ms (target ≤ 0.3 ms)")
    top = f"llproxy-{cores}w"
    ratio = median_ratio(
        [r.rps for r in results[f"{top}|json|32"]], [r.rps for r in results["nginx|json|32"]]
    )
    floor = median_ratio(
        [r.rps for r in results[f"{FLOOR}|json|32"]], [r.rps for r in results["nginx|json|32"]]
    )
    verdicts.insert(
        0,
        f"{top} non-streaming c32 throughput: {ratio:.2f}x nginx (target ≥ 0.30x); "
        f"the floor (scripts/floor_proxy.py, {cores} processes): {floor:.2f}x nginx",
    )
    stream_ratio, stream_floor = (
        median_ratio(
            [r.rps for r in results[f"{n}|stream|32"]], [r.rps for r in results["nginx|stream|32"]]
        )
        for n in (top, FLOOR)
    )
    verdicts.insert(
        1,
        f"{top} OpenAI stream c32 throughput: {stream_ratio:.2f}x nginx (target ≥ 0.50x); "
        f"the floor: {stream_floor:.2f}x nginx",
    )
    for key in ("json|32", "json|128", "stream|32", "stream|128"):
        limited = median_ratio(
            [r.rps for r in results[f"{top}+limit|{key}"]],
            bracket(results[f"{top}|{key}"], results[f"{top}|{key}|again"]),
        )
        verdicts.append(
            f"{top} with a rate limit on, {key}: {limited:.2f}x of limits off (target ≥ 0.90x)"
        )
    verdicts += dialect_verdicts(results, top)
    verdicts.append(mending_verdict(results, top))
    ttfb_rows = []
    for n in timed:
        samples = results[f"{n}|ttfb"]
        ttfb_rows.append(
            (
                n,
                statistics.median(s[0] for s in samples),
                statistics.median(s[1] for s in samples),
                max(s[2] for s in samples),
            )
        )
    direct_ttfb = ttfb_rows[0][1]
    timing = [["target", "time to first chunk ms", "gap p50 ms", "gap max ms"]]
    for n, ttfb, gap, worst in ttfb_rows:
        timing.append([n, f"{ttfb:.2f}", f"{gap:.2f}", f"{worst:.2f}"])
        if n.startswith("llproxy"):
            verdicts.append(
                f"{n}: time to first byte added {ttfb - direct_ttfb:.2f} ms (target ≤ 1 ms); "
                f"median gap {gap:.2f} ms vs upstream 10 ms (target within 1 ms)"
            )
    scan = statistics.median(results["scan"])
    verdicts.append(f"scan of 4,096 loopback ports: {scan:.2f} s (target ≤ 1 s)")

    def mb(values: list[float]) -> str:
        return ", ".join(f"{v:.0f}" for v in values) + " MB"

    for workers, values in data["idle_rss"].items():
        verdicts.append(
            f"llproxy-{workers}w worker RSS idle: {mb(values)}; "
            f"after load: {mb(data['loaded_rss'][workers])} (target ≤ 60 MB idle)"
        )
    soak = data["soak"]
    if soak:
        verdicts.append(
            f"soak: {soak['requests']:,} requests ({soak['errors']} errors) in "
            f"{soak['seconds']:.0f} s; worker RSS "
            f"{mb(soak['rss_before'])} → {mb(soak['rss_after'])}"
        )
    verdicts.append(errors_verdict(results))
    return rows, timing, verdicts


def errors_verdict(results: dict[str, list[Any]]) -> str:
    errors = sum(
        r.errors
        for key, rs in results.items()
        if "|" in key and not key.endswith(("ttfb", "|cpu"))
        for r in rs
    )
    return f"wrk errors (non-2xx or socket) over all runs: {errors}"


def markdown(
    data: dict[str, Any], rows: list[list[str]], timing: list[list[str]], verdicts: list[str]
) -> str:
    def table(rs: list[list[str]]) -> Iterator[str]:
        yield "| " + " | ".join(rs[0]) + " |"
        yield "|" + "---|" * len(rs[0])
        for r in rs[1:]:
            yield "| " + " | ".join(r) + " |"

    args = data["args"]
    machine = "\n".join(f"- {k}: {v}" for k, v in data["versions"].items())
    return f"""# Benchmarks

Made by `make bench` (`scripts/bench.py`) on {time.strftime("%Y-%m-%d")}. Every figure is
the median of {args["reps"]} repetitions; ratios are taken within each repetition (same
load, same moment) and then the median. Load: `wrk -t1 -cN -d{args["duration"]:g}s --latency`
with a POST of a small chat request, against `scripts/fast_upstream.py` (direct), nginx
as a plain reverse proxy (`proxy_buffering off`, upstream keep-alive), and llproxy with
1 worker and one per core (no rate limit, no verbose log), and one per core with a rate
limit too high to refuse (`+limit`: what limiting costs). `aiohttp-floor` is
`scripts/floor_proxy.py` with one process per core: aiohttp's low-level server passing the
request through llproxy's own HTTP client and back, with none of llproxy's features, so
llproxy ÷ floor is what its features cost and floor ÷ nginx what the design does.
Streaming: 20 SSE chunks in
the shape llama.cpp's server writes them (since 2026-12-02; before, each carried a
timestamp of its own, which the translated streams' reader cannot cut by template);
{DIALECTS_METHOD} `+limit` likewise with the mean of the limits-off runs right before and
after it.
Stream timing: the upstream's delay mode (first chunk after 100 ms, then one every 10 ms),
{args["stream_samples"]} sequential requests per target. Everything on 127.0.0.1 of one
machine: wrk, the upstream, nginx and llproxy share its cores.

## Machine
{machine}

## Results
{chr(10).join(table(rows))}

## Stream timing (upstream: first chunk after 100 ms, then every 10 ms)
{chr(10).join(table(timing))}

## Against the targets
{chr(10).join(f"- {v}" for v in verdicts)}
"""


DIALECTS_METHOD = """the same stream is also asked for as Anthropic Messages, OpenAI Responses,
Ollama chat and Gemini `streamGenerateContent?alt=sse` (c32, through llproxy with one
worker per core), and an Anthropic client's stream from an Anthropic back-end
(`anthropic-passthrough`: a managed endpoint with `"dialect": "anthropic"` in front of
`fast_upstream.py --anthropic`, the same 20 text pieces as Messages events, passed on
untranslated); each is compared with the mean of two runs of the OpenAI stream right
before and after them (the ratios' spread over the repetitions in brackets)."""


def dialects_markdown(data: dict[str, Any], verdicts: list[str]) -> str:
    args = data["args"]
    machine = ", ".join(f"{k} {v}" for k, v in data["versions"].items())
    return f"""<!-- dialects -->
## Dialect streams (`--only dialects`)

Made by `scripts/bench.py --only dialects` on {time.strftime("%Y-%m-%d")}: {args["reps"]}
repetitions of `wrk -t1 -c32 -d{args["duration"]:g}s` per stream. The OpenAI stream is 20
SSE chunks in llama.cpp's shape from `fast_upstream.py`; {DIALECTS_METHOD} The upstreams
write their 20 pieces at once, so a translated stream reads them in one go and sends its
client one text event where the OpenAI stream relays 20 chunks: a ratio above 1 comes
from that. Everything shares the machine's cores with wrk and with other work: a
ratio's spread is the machine's noise as much as the code's. A full run replaces this
section with the same lines among its own.

{chr(10).join(f"- {v}" for v in verdicts)}

Machine: {machine}.
<!-- /dialects -->
"""


def mending_markdown(data: dict[str, Any], verdicts: list[str]) -> str:
    args = data["args"]
    machine = ", ".join(f"{k} {v}" for k, v in data["versions"].items())
    return f"""<!-- mending -->
## Mending stages (`--only mending`)

Made by `scripts/bench.py --only mending` on {time.strftime("%Y-%m-%d")}: {args["reps"]}
repetitions of `wrk -t1 -c32 -d{args["duration"]:g}s`: the OpenAI stream (20 SSE chunks
in llama.cpp's shape) of a chat that offers a tool, through llproxy with tool-call
repair, thinking and loop detection on (the default for a local server), compared with
the mean of two runs through a second llproxy with them off (`"repair": {{"tool_calls":
false, "thinking": false, "loops": false}}`) right before and after it. A full run has
the same line among its own.

{chr(10).join(f"- {v}" for v in verdicts)}

Machine: {machine}.
<!-- /mending -->
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--stream-samples", type=int, default=10)
    parser.add_argument("--soak-requests", type=int, default=1_000_000)
    parser.add_argument("--soak-max-seconds", type=float, default=300.0)
    parser.add_argument("--quick", action="store_true", help="1 repetition, 2 s runs, short soak")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument(
        "--only",
        choices=["dialects", "mending", "postgres"],
        help="only the dialect streams against the OpenAI stream, only the OpenAI stream "
        "with the mending stages on against off, or only llproxy with PostgreSQL as its "
        "store against SQLite (each a section of its own)",
    )
    parser.add_argument(
        "--capacity",
        action="store_true",
        help="only the streaming capacity run (scripts/capacity.py --help: its options)",
    )
    args, rest = parser.parse_known_args()
    # `timeout` or Ctrl-C must still stop every process this run started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    if args.capacity:
        import capacity

        capacity.main([*rest, "--output", args.output])
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.quick:
        args.reps, args.duration, args.stream_samples = 1, 2.0, 3
        args.soak_requests, args.soak_max_seconds = 50_000, 20.0
    if args.only == "postgres":
        import bench_postgres

        bench_postgres.main(args, Path(args.output))
        return
    data = run(args)
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 180))
    output = Path(args.output)
    if args.only == "dialects":
        results = data["results"]
        verdicts = [
            *dialect_verdicts(results, f"llproxy-{data['cores']}w"),
            errors_verdict(results),
        ]
        for verdict in verdicts:
            console.print(f"• {verdict}", highlight=False)
        from capacity import put_section

        put_section(DIALECTS_SECTION, dialects_markdown(data, verdicts), output)
        console.print(f"written to {args.output}")
        return
    if args.only == "mending":
        results = data["results"]
        verdicts = [mending_verdict(results, f"llproxy-{data['cores']}w"), errors_verdict(results)]
        for verdict in verdicts:
            console.print(f"• {verdict}", highlight=False)
        from capacity import put_section

        put_section(MENDING_SECTION, mending_markdown(data, verdicts), output)
        console.print(f"written to {args.output}")
        return
    rows, timing, verdicts = report(data)
    for title, content in (("llproxy benchmark (medians)", rows), ("stream timing", timing)):
        table = Table(title=title)
        for column in content[0]:
            table.add_column(column)
        for row in content[1:]:
            table.add_row(*row)
        console.print(table)
    for verdict in verdicts:
        console.print(f"• {verdict}", highlight=False)
    # The capacity run (`--capacity`) writes a section of its own: kept; so are the
    # hand-written records (KEPT_SECTIONS).
    from capacity import keep_section

    old = output.read_text() if output.exists() else ""
    kept = keep_section(old) + "".join(
        "\n" + match.group(0).strip("\n") + "\n"
        for match in (section.search(old) for section in KEPT_SECTIONS)
        if match
    )
    output.write_text(markdown(data, rows, timing, verdicts) + kept)
    console.print(f"written to {args.output}")


if __name__ == "__main__":
    main()
