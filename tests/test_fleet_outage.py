"""The fleet's desk with its Redis down: a request for an operator still times out and
takes its fallback on its own host, and an operator's command is refused at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import openai
import pytest

from llproxy.process.fleet import UNREACHABLE

from .conftest import ProxyFactory, UpstreamFactory
from .operator_client import open_desk

HELLO = [{"role": "user", "content": "hello"}]


async def test_with_redis_down_requests_keep_their_timeouts_and_fallback(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await start_upstream()
    quick = {"operator": "human", "queue_timeout": 1, "idle_timeout": 1}
    endpoints = [
        upstream.endpoint(),
        {**quick, "tags": ["quick"], "fallback": "fake-model"},
        {**quick, "tags": ["alone"]},
    ]
    # Nothing listens on port 1: no host can hold the desk. (With limits on, the rate
    # counter would refuse every request first: 503.)
    desk = await open_desk(
        start_proxy,
        tmp_path / "state",
        endpoints,
        upstream,
        redis_url="redis://127.0.0.1:1/0",
        rate_limit=None,
    )
    client = desk.client()
    answer = await asyncio.wait_for(
        client.chat.completions.create(model="human:quick", messages=HELLO), 15
    )
    assert answer.model == "human:quick"
    assert (answer.choices[0].message.content or "").strip() == "w0 w1 w2 w3 w4"
    with pytest.raises(openai.APIStatusError) as caught:
        await asyncio.wait_for(
            client.chat.completions.create(model="human:alone", messages=HELLO), 15
        )
    assert caught.value.status_code == 504 and caught.value.code == "operator_timeout"
    # An operator is let in, is told, and their commands are refused rather than lost.
    headers = {"Authorization": f"Bearer {desk.keys['alice']}"}
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{desk.proxy.url}/operator/ws", headers=headers) as socket,
    ):
        assert (await socket.receive_json(timeout=10))["type"] == "hello"
        told = await socket.receive_json(timeout=10)
        assert told["type"] == "error" and UNREACHABLE in told["message"]
        await socket.send_json({"type": "claim", "id": 7, "request": "req_0"})
        refused = await socket.receive_json(timeout=10)
        assert refused == {
            "type": "refused",
            "id": 7,
            "command": "claim",
            "request": "req_0",
            "reason": UNREACHABLE,
        }
