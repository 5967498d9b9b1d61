"""The real `llproxy` command as a subprocess: serve, scan, flags, signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import openai

from llproxy import __version__

from .conftest import RunningUpstream, UpstreamFactory, write_config
from .process import LlproxyProcess

CHAT = [{"role": "user", "content": "hi"}]
Start = Callable[..., Awaitable[LlproxyProcess]]


async def run_llproxy(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llproxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def tagged_config(tmp_path: Path, upstream: RunningUpstream) -> Path:
    return write_config(tmp_path / "llproxy.json", [], endpoints=[upstream.endpoint(tags=["t"])])


async def test_version_and_python_m() -> None:
    code, out, _ = await run_llproxy("--version")
    assert code == 0 and __version__ in out


async def test_serve_proxies_and_stops_cleanly_on_sigterm(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream(model_ids=["org/m.gguf"])
    config = tagged_config(tmp_path, upstream)
    daemon = await start_llproxy("--config", str(config), "--verbose")
    await daemon.wait_for("serving on http://127.0.0.1")
    client = openai.AsyncOpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0)
    async with client:
        assert [m.id for m in (await client.models.list()).data] == ["m:t"]
        reply = await client.chat.completions.create(model="m:t", messages=CHAT)
        assert reply.choices[0].message.content
    await daemon.wait_for("POST /v1/chat/completions")
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    text = daemon.output
    assert "scan: 1 servers, 1 models" in text
    # --verbose: one plain (NO_COLOR, piped) line per request with model and upstream.
    request_lines = [ln for ln in text.splitlines() if "POST /v1/chat/completions" in ln]
    assert len(request_lines) == 1
    assert f"m:t → 127.0.0.1:{upstream.port} 200" in request_lines[0]
    assert "\x1b[" not in text


async def test_aihost_serves_one_server_without_a_config(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream(model_ids=["solo"])
    # An empty XDG dir and cwd so no config file is found by lookup.
    env = {"XDG_CONFIG_HOME": str(tmp_path), "LLPROXY_CONFIG": ""}
    daemon = await start_llproxy(
        "--aihost", "127.0.0.1", "--aihostport", str(upstream.port), env=env, cwd=tmp_path
    )
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{daemon.url}/v1/models") as resp,
    ):
        assert [m["id"] for m in (await resp.json())["data"]] == ["solo"]


async def test_scan_json(start_upstream: UpstreamFactory, tmp_path: Path) -> None:
    upstream = await start_upstream(model_ids=["org/m.gguf", "n"])
    code, out, _ = await run_llproxy(
        "scan", "--json", "--config", str(tagged_config(tmp_path, upstream))
    )
    assert code == 0
    assert json.loads(out) == [
        {
            "name": "m:t",
            "id": "org/m.gguf",
            "hostname": "127.0.0.1",
            "port": upstream.port,
            "dialect": "openai",
            "tags": ["t"],
            "state": "up",
        },
        {
            "name": "n:t",
            "id": "n",
            "hostname": "127.0.0.1",
            "port": upstream.port,
            "dialect": "openai",
            "tags": ["t"],
            "state": "up",
        },
    ]


async def test_scan_table_and_nothing_found(
    start_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    upstream = await start_upstream(model_ids=["tabled"])
    code, out, err = await run_llproxy("scan", "--config", str(tagged_config(tmp_path, upstream)))
    assert code == 0 and "tabled:t" in out and f"127.0.0.1:{upstream.port}" in out
    assert "1 models" in err

    empty = tmp_path / "empty.json"
    empty.write_text('{"endpoints": []}')
    code, out, err = await run_llproxy("scan", "--config", str(empty))
    assert code == 0 and out == ""
    assert "no models found" in err


async def test_scan_says_which_server_refused_and_why(
    start_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    locked = await start_upstream(require_key="sk-right")
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps({"endpoints": [locked.endpoint(apikey="env:UP_KEY")], "default_model": "x"})
    )
    code, out, err = await run_llproxy("scan", "--config", str(config), env={"UP_KEY": "sk-no"})
    assert code == 0 and out == ""
    assert "no models found" in err
    assert (
        f"server http://127.0.0.1:{locked.port}/v1 refused the model list: HTTP 401 "
        "Unauthorized: Invalid API key; check its apikey" in " ".join(err.split())
    )
    assert "default_model 'x' is not among the models found" in err
