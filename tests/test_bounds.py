"""Everything an upstream sends is bounded: a hostile one (anyone listening on a scanned
port) gets a clear 502 or an error event, and the worker's memory stays flat."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from .conftest import ProxyFactory, UpstreamFactory
from .fake_upstream import HostileUpstream
from .process import LlproxyProcess

MiB = 1024 * 1024
CHAT = {"model": "hostile", "messages": [{"role": "user", "content": "hi"}]}
Start = Callable[..., Awaitable[LlproxyProcess]]


async def start_hostile(aiohttp_server: Any, **knobs: Any) -> tuple[HostileUpstream, int]:
    hostile = HostileUpstream(**knobs)
    server = await aiohttp_server(hostile.app())
    assert server.port is not None
    return hostile, server.port


def endpoint(port: int) -> dict[str, Any]:
    return {"hostname": "127.0.0.1", "port_start": port, "port_end": port}


async def post(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/chat/completions", json=body) as resp,
    ):
        return resp.status, await asyncio.wait_for(resp.read(), 30)


def stream_events(raw: bytes) -> list[Any]:
    return [
        orjson.loads(line[6:])
        for line in raw.split(b"\n")
        if line.startswith(b"data: ") and line != b"data: [DONE]"
    ]


@pytest.mark.parametrize(
    ("knobs", "limits", "says"),
    [
        # 64 MiB of zeros in ~64 KiB of gzip: the ratio trips before the body limit.
        ({"mode": "gzip_bomb"}, {}, "expands more than 100 times"),
        ({"mode": "gzip_bomb"}, {"max_compression_ratio": 10000}, "larger than 1048576"),
        ({"mode": "huge_body"}, {}, "response body larger than 1048576 bytes"),
    ],
)
async def test_a_hostile_whole_body_is_a_clear_502(
    aiohttp_server: Any,
    start_proxy: ProxyFactory,
    start_upstream: UpstreamFactory,
    knobs: dict[str, Any],
    limits: dict[str, Any],
    says: str,
) -> None:
    hostile, port = await start_hostile(aiohttp_server, **knobs)
    honest = await start_upstream()
    proxy = await start_proxy([endpoint(port), honest.endpoint()], max_response_bytes=MiB, **limits)
    status, raw = await post(proxy.url, CHAT)
    assert status == 502, raw
    error = orjson.loads(raw)["error"]
    assert error["code"] == "upstream_too_large" and says in error["message"]
    if knobs["mode"] == "huge_body":  # a bomb is small enough to arrive whole
        # Cut off: the upstream could not send all it wanted, and noticed the hang-up.
        await asyncio.wait_for(hostile.client_left.wait(), 10)
        assert hostile.sent < hostile.size
    # The proxy keeps serving.
    status, raw = await post(proxy.url, {**CHAT, "model": "fake-model"})
    assert status == 200 and orjson.loads(raw)["choices"]


@pytest.mark.parametrize("mode", ["endless_line", "gzip_bomb"])
async def test_a_hostile_stream_is_cut_with_an_error(
    aiohttp_server: Any, start_proxy: ProxyFactory, mode: str
) -> None:
    hostile, port = await start_hostile(aiohttp_server, mode=mode, stream=True)
    proxy = await start_proxy([endpoint(port)], max_event_bytes=64 * 1024)
    status, raw = await post(proxy.url, {**CHAT, "stream": True})
    if mode == "endless_line":
        await asyncio.wait_for(hostile.client_left.wait(), 10)
        assert hostile.sent < hostile.size
    if status == 200:  # something reached the client first: the error is the last event
        error = stream_events(raw)[-1]["error"]
    else:
        assert status == 502
        error = orjson.loads(raw)["error"]
    assert error["code"] == "upstream_too_large"


async def test_an_endless_line_after_a_good_event_ends_the_stream_with_an_error(
    aiohttp_server: Any, start_proxy: ProxyFactory
) -> None:
    hostile, port = await start_hostile(aiohttp_server, mode="endless_line", stream=True)
    hostile.prefix = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    proxy = await start_proxy([endpoint(port)], max_event_bytes=64 * 1024)
    status, raw = await post(proxy.url, {**CHAT, "stream": True})
    assert status == 200
    events = stream_events(raw)
    assert events[0]["choices"][0]["delta"]["content"] == "hi"
    assert events[-1]["error"]["code"] == "upstream_too_large"
    assert "stream event larger than 65536 bytes" in events[-1]["error"]["message"]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_bombs_leave_the_worker_memory_flat(
    aiohttp_server: Any, start_llproxy: Start, tmp_path: Path
) -> None:
    """With the default bounds, a 1 GiB gzip bomb and a 256 MiB line cost the worker far
    less than their size, and /health answers throughout."""
    _, bomb_port = await start_hostile(aiohttp_server, mode="gzip_bomb", size=1024 * MiB)
    line, line_port = await start_hostile(
        aiohttp_server, mode="endless_line", size=256 * MiB, stream=True
    )
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps({"endpoints": [endpoint(bomb_port), endpoint(line_port)], "rate_limit": None})
    )
    line.model_id = "liner"
    daemon = await start_llproxy("--config", str(config), "--workers", "1")
    async with aiohttp.ClientSession() as session:
        pid = (await daemon.health(session))["pid"]
    before = peak_rss_mb(pid)
    status, raw = await post(daemon.url, CHAT)
    assert status == 502 and b"upstream_too_large" in raw
    status, raw = await post(daemon.url, {**CHAT, "model": "liner", "stream": True})
    assert b"upstream_too_large" in raw
    after = peak_rss_mb(pid)
    # The body bound alone is 64 MiB; neither attack came near it.
    assert after - before < 48, (before, after)
    assert line.sent < 16 * MiB
    async with aiohttp.ClientSession() as session:
        assert (await daemon.health(session))["status"] == "ok"
