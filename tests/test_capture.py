"""The wire capture: exchanges from every client dialect written as JSON lines with no
secret in them, narrowed by model, key or failure, rotated by size, counted in /metrics,
read back by `llproxy capture show`; and `serve --capture DIR` in a real process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx
import openai
import pytest

from llproxy.config import Capture, ConfigError, parse_config
from llproxy.telemetry.capture import CaptureWriter, Exchange, read_exchanges

from .conftest import ProxyFactory, RunningProxy, scenario_endpoint
from .process import LlproxyProcess, create_key, run_cli
from .scenario_upstream import ScenarioUpstream

STATIC = "static-client-key-0123456789"  # a key from the config's api_keys
UPSTREAM_KEY = "sk-up-7"  # what start_proxy's environment holds for env:TEST_KEY
BODY_SECRET = "body-secret-value-123"
CHAT = [{"role": "user", "content": "hi"}]
GEMINI = "/v1beta/models/fake-model:generateContent"
Start = Callable[..., Awaitable[LlproxyProcess]]


def lines(directory: Path) -> list[dict[str, Any]]:
    return [dict(entry) for entry in read_exchanges(directory)]


async def llproxy_command(*args: str) -> tuple[int, str, str]:
    """A one-shot `llproxy` command that runs while this test's in-process proxy serves."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llproxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def header(entry: dict[str, Any], name: str) -> str:
    headers = entry["request"]["headers"]
    return next(v for k, v in headers.items() if k.lower() == name)


def stop_capture(proxy: RunningProxy) -> None:
    """Everything queued written: the writer's own close, as the app's cleanup calls it."""
    capture = proxy.state.accounting.capture
    assert capture is not None
    capture.close()


async def test_every_dialect_is_captured_without_a_secret(
    start_proxy: ProxyFactory, scenario: ScenarioUpstream, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    stored = create_key(state, "team")
    directory = tmp_path / "capture"
    proxy = await start_proxy(
        [scenario_endpoint(scenario, apikey="env:TEST_KEY")],
        state_dir=str(state),
        api_keys=[STATIC],
        capture={"dir": str(directory)},
    )
    await proxy.rescan()
    client = proxy.client(api_key=stored)
    stream = await client.chat.completions.create(
        model="fake-model", messages=CHAT, stream=True, extra_body={"api_key": BODY_SECRET}
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    async with anthropic.AsyncAnthropic(
        base_url=proxy.url, api_key=STATIC, max_retries=0
    ) as claude:
        message = await claude.messages.create(
            model="fake-model", max_tokens=50, system="Be brief.", messages=CHAT
        )
        assert message.content
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    async with httpx.AsyncClient(base_url=proxy.url) as raw:
        assert (await raw.post(f"{GEMINI}?key={stored}", json=body)).status_code == 200
        assert (
            await raw.post(GEMINI, json=body, headers={"x-goog-api-key": STATIC})
        ).status_code == 200
        claude_body = {"model": "fake-model", "max_tokens": 50, "messages": CHAT}
        assert (
            await raw.post("/v1/messages", json=claude_body, headers={"x-api-key": STATIC})
        ).status_code == 200
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=CHAT)
    async with httpx.AsyncClient() as raw:
        metrics = (await raw.get(f"{proxy.url}/metrics")).text
    assert "llproxy_capture_exchanges_total 6.0" in metrics
    assert "llproxy_capture_dropped_total 0.0" in metrics
    stop_capture(proxy)

    files = list(directory.iterdir())
    assert [f.name for f in files] == ["capture-0.jsonl"]
    written = files[0].read_text()
    for secret in (stored, STATIC, UPSTREAM_KEY, BODY_SECRET):
        assert secret not in written
    entries = lines(directory)
    assert [(e["dialect"], e["status"]) for e in entries] == [
        ("openai", 200),
        ("anthropic", 200),
        ("gemini", 200),
        ("gemini", 200),
        ("anthropic", 200),
        ("openai", 404),
    ]
    streamed, translated, by_query, by_header, by_x_api_key, failed = entries
    assert streamed["key"] == "team" and streamed["served"] == "fake-model"
    assert streamed["upstream"] and streamed["response"]["body"].startswith("data: {")
    assert header(streamed, "authorization") == "***"
    timings = streamed["timings"]
    assert 0 <= timings["first_byte_ms"] <= timings["last_byte_ms"]
    # A translated exchange: the client's Anthropic request and the Anthropic answer it got.
    assert translated["upstream_dialect"] == "openai" and translated["key"] == "static-1"
    assert header(translated, "authorization") == "***"
    assert json.loads(translated["request"]["body"])["max_tokens"] == 50
    assert json.loads(translated["response"]["body"])["type"] == "message"
    # ... and the other side: the OpenAI-shaped request routed and the upstream's answer.
    routed = json.loads(translated["upstream_request"]["body"])
    assert routed["messages"] == [{"role": "system", "content": "Be brief."}, *CHAT]
    assert json.loads(translated["upstream_response"]["body"])["choices"]
    assert json.loads(by_query["upstream_request"]["body"])["messages"]
    assert streamed["upstream_response"]["body"].startswith("data: {")
    assert by_query["request"]["path"] == f"{GEMINI}?key=***"
    assert header(by_header, "x-goog-api-key") == "***"
    assert header(by_x_api_key, "x-api-key") == "***"
    assert failed["model"] == "no-such-model" and failed["served"] is None
    assert json.loads(failed["response"]["body"])["error"]

    shown = run_cli("capture", "show", "--dir", str(directory), state=state)
    assert shown.returncode == 0, shown.stderr
    assert "Hello, world!" in shown.stdout and "events)" in shown.stdout
    assert "no-such-model" in shown.stdout
    only_failed = run_cli("capture", "show", "--dir", str(directory), "--failed", state=state)
    assert "no-such-model" in only_failed.stdout and "fake-model" not in only_failed.stdout
    as_json = run_cli(
        "capture", "show", "--dir", str(directory), "--json", "--last", "2", state=state
    )
    assert [e["id"] for e in json.loads(as_json.stdout)] == [by_x_api_key["id"], failed["id"]]
    by_model = run_cli(
        "capture", "show", "--dir", str(directory), "--model", "no-*", "--json", state=state
    )
    assert [e["status"] for e in json.loads(by_model.stdout)] == [404]

    # Replayed with a key of the caller's (the capture holds none): the answer beside.
    before = len(scenario.bodies())
    code, out, err = await llproxy_command(
        "capture", "replay", by_x_api_key["id"], "--dir", str(directory),
        "--url", proxy.url, "--key", STATIC,
    )  # fmt: skip
    assert code == 0, err
    assert "captured: 200" in out and "now: 200" in out and "Hello, world!" in out
    assert len(scenario.bodies()) == before + 1  # it reached the model again
    code, out, err = await llproxy_command(
        "capture", "replay", by_x_api_key["id"], "--dir", str(directory), "--url", proxy.url
    )
    assert code == 0 and "now: 401" in out  # without a key: refused, shown as it is
    code, out, err = await llproxy_command("capture", "replay", "nope", "--dir", str(directory))
    assert code == 1 and "no captured exchange nope" in err


@pytest.mark.parametrize(
    ("narrowed", "statuses"),
    [
        ({"models": ["other-*"]}, []),
        ({"models": ["fake-*"]}, [200]),
        ({"failed_only": True}, [404]),
        ({"keys": ["nobody"]}, []),
    ],
)
async def test_capture_is_narrowed(
    start_proxy: ProxyFactory,
    scenario: ScenarioUpstream,
    tmp_path: Path,
    narrowed: dict[str, Any],
    statuses: list[int],
) -> None:
    directory = tmp_path / "capture"
    proxy = await start_proxy(
        [scenario_endpoint(scenario)], capture={"dir": str(directory), **narrowed}
    )
    await proxy.rescan()
    client = proxy.client()
    await client.chat.completions.create(model="fake-model", messages=CHAT)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=CHAT)
    stop_capture(proxy)
    assert [e["status"] for e in lines(directory)] == statuses


def exchange(number: int) -> Exchange:
    return Exchange(
        1000.0 + number, 0.01, 0.02, "POST", "/v1/chat/completions", (), b"{}", 200,
        b"x" * 300, "openai", "openai", f"m{number}", f"m{number}", "127.0.0.1:1", None, None,
    )  # fmt: skip


def test_files_rotate_by_size_and_are_bounded(tmp_path: Path) -> None:
    writer = CaptureWriter(Capture(str(tmp_path), max_bytes=2000, files=3), 7, ())
    writer.start()
    for number in range(40):
        while not writer.offer(exchange(number)):  # the queue is bounded: wait for room
            pass
    writer.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["capture-7.jsonl", "capture-7.jsonl.1", "capture-7.jsonl.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    kept = [e["model"] for e in lines(tmp_path)]
    # The newest exchanges, in order, none repeated; the oldest rotated away.
    assert kept == [f"m{n}" for n in range(40 - len(kept), 40)] and "m0" not in kept


def test_a_full_queue_drops_instead_of_waiting(tmp_path: Path) -> None:
    writer = CaptureWriter(Capture(str(tmp_path)), 0, (), size=2)  # not started: never drains
    assert [writer.offer(exchange(n)) for n in range(4)] == [True, True, False, False]


def test_config_errors_name_the_field() -> None:
    for capture, message in (
        ({}, "capture.dir: required"),
        ({"dir": "/x", "files": 0}, "capture.files: must be > 0"),
        ({"dir": "/x", "max_bytes": "1"}, "capture.max_bytes: must be"),
        ({"dir": "/x", "models": "m*"}, "capture.models: must be a list"),
        ({"dir": "/x", "failed_only": 1}, "capture.failed_only: must be a boolean"),
        ({"dir": "/x", "size": 1}, "capture.size: unknown key"),
        ({"dir": "/x", "enable": "no"}, "capture.enable: must be a boolean"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config({"capture": capture})
    assert parse_config({}).capture is None
    assert parse_config({"capture": {"dir": "/x", "enable": False}}).capture is None
    assert parse_config({"capture": {"dir": "/x", "keys": ["a"]}}).capture == Capture(
        "/x", keys=("a",)
    )


async def test_serve_capture_flag_writes_a_file_per_worker(
    scenario: ScenarioUpstream, start_llproxy: Start, tmp_path: Path
) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"endpoints": [scenario_endpoint(scenario)]}))
    directory = tmp_path / "capture"
    daemon = await start_llproxy(
        "--config", str(config), "--workers", "2", "--capture", str(directory)
    )
    async with aiohttp.ClientSession() as session:
        for _ in range(6):
            body = {"model": "fake-model", "messages": CHAT}
            async with session.post(f"{daemon.url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    assert all(p.name.startswith("capture-") for p in directory.iterdir())
    assert len(lines(directory)) == 6
    code = run_cli("capture", "show", "--dir", str(directory), "--last", "1", state=tmp_path)
    assert code.returncode == 0 and "fake-model" in code.stdout
