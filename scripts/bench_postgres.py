"""`bench.py --only postgres`: llproxy with PostgreSQL as its store of keys and usage
against the same llproxy with SQLite, each as a ratio to nginx in the same repetition.

Both llproxies run one worker per core with a static key checked on every request and a
usage record written for each; the PostgreSQL one writes them to a throwaway cluster
(tests/pg_cluster.py) in batches. The load alternates nginx, SQLite, PostgreSQL within
each repetition, so the machine's drift touches all three alike. Writes a section of its
own to BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench
from capacity import put_section

sys.path.insert(0, str(bench.ROOT))
from tests.pg_cluster import PgCluster

SECTION = re.compile(r"\n?<!-- postgres -->.*<!-- /postgres -->\n?", re.S)
KEY = "bench-static-key-0123456789"


def run(args: Any) -> dict[str, Any]:
    bench.ensure_tools()
    workdir = Path(tempfile.mkdtemp(prefix="llproxy-bench-pg-"))
    procs = bench.Processes(workdir)
    cluster = PgCluster()
    cores = os.cpu_count() or 1
    results: dict[str, list[Any]] = {}
    try:
        fast, nginx_port = bench.free_port(), bench.free_port()
        upstream = [bench.PYTHON, str(bench.ROOT / "scripts/fast_upstream.py")]
        procs.start("upstream", [*upstream, "--chunks", "20", "--port", str(fast)])
        conf = bench.nginx_conf(workdir, [(nginx_port, fast)])
        procs.start("nginx", ["nginx", "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"])
        base = {
            "interval": 600000,
            "rate_limit": None,
            "api_keys": [KEY],
            "endpoints": [{"hostname": "127.0.0.1", "port_start": fast, "port_end": fast}],
        }
        ports = {}
        for store, extra in (
            ("sqlite", {"state_dir": str(workdir / "state-sqlite")}),
            (
                "postgres",
                {"state_dir": str(workdir / "state-pg"), "database_url": cluster.url()},
            ),
        ):
            config = workdir / f"{store}.json"
            config.write_text(json.dumps({**base, **extra}))
            ports[store] = bench.free_port()
            procs.start(
                f"llproxy-{store}",
                [
                    bench.PYTHON,
                    "-m",
                    "llproxy",
                    "serve",
                    "--config",
                    str(config),
                    "--bindport",
                    str(ports[store]),
                    "--workers",
                    str(cores),
                ],
            )
        for port in (fast, nginx_port, *ports.values()):
            bench.wait_listening(port)
        time.sleep(2)  # workers become ready after the first scan
        targets = {"nginx": nginx_port, **ports}
        script = workdir / "chat.lua"
        bench.lua_script(script, "bench-model", False)
        script.write_text(script.read_text() + f'wrk.headers["Authorization"] = "Bearer {KEY}"\n')
        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}", flush=True)
            for conns in (32, 128):
                for name, port in targets.items():
                    result = bench.wrk(
                        f"http://127.0.0.1:{port}{bench.CHAT_PATH}", script, conns, args.duration
                    )
                    results.setdefault(f"{name}|{conns}", []).append(result)
        time.sleep(2)  # the last batches written
        written = pg_count(cluster.url())
        return {"results": results, "cores": cores, "written": written, "args": vars(args)}
    finally:
        procs.stop_all()
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def pg_count(url: str) -> int:
    import asyncio

    import asyncpg

    async def count() -> int:
        conn = await asyncpg.connect(url)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM usage"))
        finally:
            await conn.close()

    return asyncio.run(count())


def verdicts(data: dict[str, Any]) -> list[str]:
    results = data["results"]
    lines = []
    for conns in (32, 128):
        nginx = [r.rps for r in results[f"nginx|{conns}"]]
        ratios = {
            store: bench.median_ratio([r.rps for r in results[f"{store}|{conns}"]], nginx)
            for store in ("sqlite", "postgres")
        }
        rps = {s: statistics.median(r.rps for r in results[f"{s}|{conns}"]) for s in ratios}
        lines.append(
            f"json c{conns}: SQLite {rps['sqlite']:,.0f} req/s ({ratios['sqlite']:.2f}x nginx), "
            f"PostgreSQL {rps['postgres']:,.0f} req/s ({ratios['postgres']:.2f}x nginx): "
            f"PostgreSQL ÷ SQLite {ratios['postgres'] / ratios['sqlite']:.2f}"
        )
    total = sum(r.requests for key, rs in results.items() if key.startswith("postgres") for r in rs)
    lines.append(
        f"usage records in PostgreSQL after the runs: {data['written']:,}; wrk counted "
        f"{total:,} answers (only those within its window: the requests in flight at its "
        "end are answered and recorded too)"
    )
    lines.append(bench.errors_verdict(results))
    return lines


def markdown(data: dict[str, Any], lines: list[str]) -> str:
    args = data["args"]
    return f"""<!-- postgres -->
## PostgreSQL as the store (`--only postgres`)

Made by `scripts/bench.py --only postgres` on {time.strftime("%Y-%m-%d")}: {args["reps"]}
repetitions of `wrk -t1 -cN -d{args["duration"]:g}s` of a small chat with a static key,
through llproxy with {data["cores"]} workers and its keys and usage in SQLite, then in
PostgreSQL (a throwaway cluster on the same machine, usage written in batches by the
master), each as a ratio to nginx in the same repetition. All of it shares the machine's
cores: PostgreSQL's own work counts against llproxy here.

{chr(10).join(f"- {line}" for line in lines)}
<!-- /postgres -->
"""


def main(args: Any, output: Path) -> None:
    data = run(args)
    lines = verdicts(data)
    for line in lines:
        print(f"• {line}")
    put_section(SECTION, markdown(data, lines), output)
    print(f"written to {output}")
