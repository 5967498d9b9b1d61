"""A worker holds only what its configured features use: the libraries of PostgreSQL,
Redis, Prometheus rendering, JSON Schema, RE2, json-repair, rich and click, and the
master's own modules, are not loaded by a worker that served and retired with them off
(each costs it memory for its whole life; BENCHMARKS.md's rss section has the figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Loaded only where a feature asks for them (the comment at each import says which).
OPTIONAL = (
    "asyncpg",  # database_url
    "redis",  # redis_url
    "prometheus_client",  # /metrics rendered (by the master)
    "jsonschema",  # a tool call checked against its schema
    "re2",  # a prompt redacted, a schema's pattern
    "json_repair",  # a tool call written as almost-JSON
    "rich",  # the first coloured log line
    "click",  # the command line (the master's)
)
MASTER_ONLY = (
    "llproxy.cli",
    "llproxy.process.supervisor",
    "llproxy.process.services",
    "llproxy.process.fleet",
    "llproxy.process.fleet_scan",
    "llproxy.process.preflight",
    "llproxy.stores.postgres",
    "llproxy.stores.redis",
    "llproxy.ui.console",
)


def worker_modules(config: dict[str, object]) -> set[str]:
    """The modules of a real worker, spawned as the supervisor spawns one, after it served."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tests.worker_probe import main; main()",
            json.dumps(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def test_a_worker_with_optional_features_off_loads_none_of_their_libraries(
    tmp_path: Path,
) -> None:
    modules = worker_modules(
        {
            "state_dir": str(tmp_path),
            "endpoints": [{"hostname": "127.0.0.1", "port_start": 9, "port_end": 9}],
        }
    )
    # What every worker serves with is there: the probe sees a worker's modules at all.
    assert {"aiohttp", "uvloop", "llproxy.process.worker", "llproxy.server.app"} <= modules
    loaded = {name.split(".")[0] for name in modules} & set(OPTIONAL)
    assert loaded == set()
    assert modules & set(MASTER_ONLY) == set()


def test_the_llproxy_script_run_again_by_spawn_loads_no_cli(tmp_path: Path) -> None:
    """Spawn runs the parent's `__main__` file again in every worker, as `__mp_main__`:
    for the installed `llproxy` script that must not import the command line."""
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = entry["llproxy"].split(":")
    script = tmp_path / "llproxy"  # what pip writes for the entry point
    script.write_text(
        f"import sys\nfrom {module} import {function}\n"
        f"if __name__ == '__main__':\n    sys.exit({function}())\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, runpy, sys; runpy.run_path(sys.argv[1], run_name='__mp_main__'); "
            "print(json.dumps(sorted(sys.modules)))",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout))
    assert module in modules
    assert {"click", "llproxy.cli"} & modules == set()
