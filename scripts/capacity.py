"""`scripts/bench.py --capacity`: how many long streams llproxy carries at once.

N clients each stream a 200-token answer at 20 tokens/s from the fake upstream (paced:
one timer for every stream), straight from the upstream, through nginx and through
llproxy (as OpenAI and as Anthropic streams), for N = 250 … 4,000 as far as the file
limit allows. Per N and target: time to first chunk and the gaps between chunks (p50,
p99; "added" is over the direct figure of the same N), errors, llproxy's worker RSS. The
clients run in two processes of their own (scripts/stream_clients.py). Writes its
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import (
    HELLO,
    PYTHON,
    ROOT,
    Processes,
    ensure_tools,
    free_port,
    nginx_conf,
    rss_mb,
    start_floor,
    versions,
    wait_listening,
    workers_of,
)

STEPS = (250, 500, 1000, 2000, 4000)
TOKENS = 200
GAP_MS = 50.0  # 20 tokens a second
FIRST_MS = 100.0
CLIENT_PROCESSES = 2
START_SPREAD = 1.0  # seconds over which the N clients start
TARGET_GAP_MS = 10.0  # the headline: at most this much added to the p99 gap
SECTION = re.compile(r"\n?<!-- capacity -->.*<!-- /capacity -->\n?", re.S)
TARGETS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # name: (dialect, path, extra body fields)
    "direct": ("openai", "/v1/chat/completions", {"messages": HELLO}),
    "nginx": ("openai", "/v1/chat/completions", {"messages": HELLO}),
    # scripts/floor_proxy.py: aiohttp and llproxy's own client, none of llproxy's features
    "aiohttp-floor": ("openai", "/v1/chat/completions", {"messages": HELLO}),
    "llproxy": ("openai", "/v1/chat/completions", {"messages": HELLO}),
    "llproxy anthropic": ("anthropic", "/v1/messages", {"max_tokens": 256, "messages": HELLO}),
}


def raise_file_limit() -> int:
    """The soft limit on open files up to the hard one, for this run and what it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def gap_percentile(histogram: Counter[int], q: float) -> float:
    """A percentile of the gaps (kept in tenths of a millisecond), in milliseconds."""
    total = histogram.total()
    if not total:
        return float("nan")
    rank = min(total - 1, int(q * total))
    seen = 0
    for tenths in sorted(histogram):
        seen += histogram[tenths]
        if seen > rank:
            return tenths / 10
    return float("nan")


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time these processes used so far."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def streams(
    port: int, target: str, count: int, proxy: list[int], workers: list[int], workdir: Path
) -> dict[str, Any]:
    """Run `count` streams against a port at once; the merged figures of the clients,
    the CPU the `proxy` processes used per chunk, the peak RSS of llproxy's `workers`."""
    dialect, path, fields = TARGETS[target]
    body = json.dumps({"model": "bench-model", "stream": True, **fields})
    outs = []
    clients = []
    for i in range(CLIENT_PROCESSES):
        share = count // CLIENT_PROCESSES + (i < count % CLIENT_PROCESSES)
        out = open(workdir / f"clients-{i}.json", "w+b")  # noqa: SIM115 - closed below
        outs.append(out)
        command = [PYTHON, str(ROOT / "scripts/stream_clients.py"), "--port", str(port)]
        command += ["--path", path, "--body", body, "--dialect", dialect]
        command += ["--count", str(share), "--chunks", str(TOKENS)]
        command += ["--spread", str(START_SPREAD)]
        clients.append(subprocess.Popen(command, stdout=out))
    cpu_before = cpu_seconds(proxy)
    peak = dict.fromkeys(workers, 0.0)
    deadline = time.monotonic() + START_SPREAD + TOKENS * GAP_MS / 1000 + 90
    while any(c.poll() is None for c in clients) and time.monotonic() < deadline:
        for pid in workers:
            peak[pid] = max(peak[pid], rss_mb(pid))
        time.sleep(0.5)
    cpu = cpu_seconds(proxy) - cpu_before
    ttfc: list[float] = []
    gaps: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    for client, out in zip(clients, outs, strict=True):
        if client.poll() is None:
            client.kill()
            client.wait()
            errors["client did not finish"] += 1
            continue
        out.seek(0)
        result = json.loads(out.read() or b"{}")
        out.close()
        ttfc += result.get("ttfc_ms", [])
        gaps.update({int(k): v for k, v in result.get("gaps", {}).items()})
        errors.update(result.get("errors", {"client failed": 1}))
    ttfc.sort()
    return {
        "ttfc_p50": percentile(ttfc, 0.50),
        "ttfc_p99": percentile(ttfc, 0.99),
        "gap_p50": gap_percentile(gaps, 0.50),
        "gap_p99": gap_percentile(gaps, 0.99),
        "errors": dict(errors),
        "rss": [round(peak[pid], 1) for pid in workers] if workers else [],
        # Every chunk of every stream (failed ones too) went through the proxy, or was meant to.
        "cpu_us_per_chunk": cpu / (count * TOKENS) * 1e6 if proxy else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    ensure_tools()
    limit = raise_file_limit()
    # The fullest process holds two descriptors a stream (nginx, or llproxy with one
    # worker), besides what Python and aiohttp keep open.
    steps = [n for n in args.steps if 2 * n + 512 <= limit]
    workdir = Path(tempfile.mkdtemp(prefix="llproxy-capacity-"))
    procs = Processes(workdir)
    cores = os.cpu_count() or 1
    results: dict[str, dict[int, dict[str, Any]]] = {t: {} for t in TARGETS}
    try:
        upstream = free_port()
        procs.start(
            "upstream",
            [
                PYTHON,
                str(ROOT / "scripts/fast_upstream.py"),
                "--port",
                str(upstream),
                "--delay",
                "--paced",
                "--chunks",
                str(TOKENS),
                "--first-ms",
                str(FIRST_MS),
                "--gap-ms",
                str(GAP_MS),
            ],
        )
        nginx = free_port()
        conf = nginx_conf(workdir, [(nginx, upstream)], connections=limit)
        nginx_master = procs.start(
            "nginx", ["nginx", "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"]
        )
        floor, floor_master = start_floor(procs, upstream, cores)
        config = workdir / "llproxy.json"
        config.write_text(
            json.dumps(
                {
                    "interval": 600000,
                    # One client address opens thousands of streams: no limit to meet.
                    "rate_limit": None,
                    "endpoints": [{"hostname": "127.0.0.1", "port_start": upstream}],
                }
            )
        )
        os.environ["LLPROXY_STATE_DIR"] = str(workdir / "state")
        port = free_port()
        command = [PYTHON, "-m", "llproxy", "serve", "--config", str(config)]
        command += ["--bindport", str(port), "--workers", str(cores)]
        llproxy = procs.start("llproxy", command)
        for each in (upstream, nginx, floor, port):
            wait_listening(each)
        time.sleep(2)  # the workers serve once the first scan is in
        workers = workers_of(llproxy.pid)
        idle = [round(rss_mb(pid), 1) for pid in workers]
        ports = {
            "direct": upstream,
            "nginx": nginx,
            "aiohttp-floor": floor,
            "llproxy": port,
            "llproxy anthropic": port,
        }
        busy = {
            "nginx": children(nginx_master.pid),
            "aiohttp-floor": children(floor_master.pid),
            "llproxy": workers,
        }
        load: list[float] = []
        for n in steps:
            load.append(os.getloadavg()[0])
            for target, target_port in ports.items():
                print(f"capacity: {n} streams, {target}", flush=True)
                watched = workers if target.startswith("llproxy") else []
                proxy = busy.get(target.split()[0], [])
                results[target][n] = streams(target_port, target, n, proxy, watched, workdir)
                time.sleep(1)
        after = [round(rss_mb(pid), 1) for pid in workers]
        return {
            "results": {t: {str(n): r for n, r in rs.items()} for t, rs in results.items()},
            "steps": steps,
            "skipped": [n for n in args.steps if n not in steps],
            "file_limit": limit,
            "idle_rss": idle,
            "after_rss": after,
            "cores": cores,
            "load": [*load, os.getloadavg()[0]],
            "versions": versions(),
        }
    finally:
        procs.stop_all()


def headline(data: dict[str, Any], target: str) -> int:
    """The largest N up to which the target adds at most TARGET_GAP_MS to the p99 gap
    with no error (0: not even the first)."""
    best = 0
    direct = data["results"]["direct"]
    for n in data["steps"]:
        r = data["results"][target][str(n)]
        if r["errors"] or r["gap_p99"] - direct[str(n)]["gap_p99"] > TARGET_GAP_MS:
            break
        best = n
    return best


def markdown(data: dict[str, Any]) -> str:
    rows = [
        "| N | target | first chunk p50 / p99 ms | added p50 / p99 | gap p50 / p99 ms "
        "| added p50 / p99 | errors | proxy CPU µs a chunk | llproxy worker RSS peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in data["steps"]:
        direct = data["results"]["direct"][str(n)]
        for target in TARGETS:
            r = data["results"][target][str(n)]
            added = target != "direct"

            def pair(key: str, r: dict[str, Any] = r) -> str:
                return f"{r[key + '_p50']:.1f} / {r[key + '_p99']:.1f}"

            def plus(key: str, r: dict[str, Any] = r, direct: dict[str, Any] = direct) -> str:
                return " / ".join(
                    f"{r[f'{key}_{q}'] - direct[f'{key}_{q}']:+.1f}" for q in ("p50", "p99")
                )

            cpu = "-" if r["cpu_us_per_chunk"] is None else f"{r['cpu_us_per_chunk']:.0f}"
            errors = sum(r["errors"].values())
            detail = (
                f" ({', '.join(f'{k}: {v}' for k, v in r['errors'].items())})" if errors else ""
            )
            rows.append(
                f"| {n:,} | {target} | {pair('ttfc')} | {plus('ttfc') if added else '-'} "
                f"| {pair('gap')} | {plus('gap') if added else '-'} | {errors}{detail} "
                f"| {cpu} "
                f"| {', '.join(f'{v:.0f}' for v in r['rss']) or '-'} |"
            )
    openai, anthropic = headline(data, "llproxy"), headline(data, "llproxy anthropic")
    nginx, floor = headline(data, "nginx"), headline(data, "aiohttp-floor")
    skipped = (
        f" N = {', '.join(map(str, data['skipped']))} skipped: the file limit is "
        f"{data['file_limit']}."
        if data["skipped"]
        else ""
    )
    machine = ", ".join(f"{k} {v}" for k, v in data["versions"].items() if k != "wrk")
    idle = ", ".join(f"{v:.0f}" for v in data["idle_rss"])
    after = ", ".join(f"{v:.0f}" for v in data["after_rss"])

    def per_core(target: str) -> str:
        """Streams one core could carry at the target's median CPU a chunk."""
        costs = [data["results"][target][str(n)]["cpu_us_per_chunk"] for n in data["steps"]]
        cost = statistics.median(costs)
        return f"{cost:.0f} µs a chunk, about {1e6 / (cost * 1000 / GAP_MS):,.0f} streams a core"

    return f"""<!-- capacity -->
## Streaming capacity

Made by `scripts/bench.py --capacity` (`scripts/capacity.py`, also part of `make bench`)
on {time.strftime("%Y-%m-%d")}, one run. N clients at once (started evenly over
{START_SPREAD:g} s, in {CLIENT_PROCESSES} client processes of their own) each stream a
{TOKENS}-token answer at {1000 / GAP_MS:g} tokens/s (first chunk after {FIRST_MS:g} ms)
from `scripts/fast_upstream.py --paced`, in llama.cpp's chunk shape: straight from the
upstream (direct), through nginx (`proxy_buffering off`), through `aiohttp-floor`
(`scripts/floor_proxy.py`, {data["cores"]} processes: aiohttp's low-level server and
llproxy's own client with none of its features, the least this design costs), and
through llproxy with {data["cores"]} workers (no rate limit), as an OpenAI stream and as
an Anthropic one.
"Added" is over the direct figure of the same N; the gap is the time between two token
chunks' arrivals (p99 over every gap of every stream); the proxy's CPU is what its
processes (nginx's workers, llproxy's) used during the run over the N x {TOKENS}
chunks, so a core of its own would carry about 1,000,000 / ({1000 / GAP_MS:g} x that)
streams.{skipped} Everything runs on the
{data["cores"]} cores of one machine (clients, upstream, nginx, llproxy), which other
work shared during the run (load average over one minute, at each N and at the end:
{", ".join(f"{v:.1f}" for v in data["load"])}): the figures are noisy, and at high N the
upstream and the clients compete with the proxy for the same cores.

**Headline: llproxy adds at most {TARGET_GAP_MS:g} ms to the p99 gap with 0 errors up to
N = {openai:,} (OpenAI stream) and N = {anthropic:,} (Anthropic stream); nginx up to
N = {nginx:,}; the floor up to N = {floor:,}.** Median CPU: llproxy {per_core("llproxy")}
(Anthropic: {per_core("llproxy anthropic")}), nginx {per_core("nginx")}, the floor
{per_core("aiohttp-floor")}. Worker RSS: {idle} MB idle
before, {after} MB after the run.

{chr(10).join(rows)}

Machine: {machine}.
<!-- /capacity -->
"""


def keep_section(old: str) -> str:
    """The capacity section of an existing BENCHMARKS.md, for the main run to keep."""
    match = SECTION.search(old)
    return "\n" + match.group(0).strip("\n") + "\n" if match else ""


def put_section(pattern: re.Pattern[str], section: str, output: Path) -> None:
    """Replace the section `pattern` finds in `output` with `section`, or append it."""
    old = output.read_text() if output.exists() else ""
    if pattern.search(old):
        text = pattern.sub(lambda _: "\n" + section, old, count=1)
    else:
        text = old.rstrip("\n") + "\n\n" + section
    output.write_text(text)


def write(data: dict[str, Any], output: Path) -> None:
    put_section(SECTION, markdown(data), output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    data = run(args)
    section = markdown(data)
    print(section)
    write(data, Path(args.output))
    (Path(tempfile.gettempdir()) / "llproxy-capacity.json").write_text(json.dumps(data))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
