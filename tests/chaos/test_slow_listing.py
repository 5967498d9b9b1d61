"""A server that keeps serving completions while its model listing is slower than
`timeouts.scan` at most rescans, against a real daemon rescanning every second: no
request may get a 404 while it serves; once every rescan fails, its models go after
`discovery.forget_after` of them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from ..fake_upstream import FakeUpstream
from ..process import LlproxyProcess

Start = Callable[..., Awaitable[LlproxyProcess]]


@dataclass
class SlowLister(FakeUpstream):
    """Lists quickly only every `quick_every`-th time (0: never again)."""

    quick_every: int = 3
    asked: int = 0  # counted before the wait: a probe that gives up cancels the handler

    async def _models(self, request: web.Request) -> web.Response:
        self.asked += 1
        if not self.quick_every or self.asked % self.quick_every:
            await asyncio.sleep(3)
        return await super()._models(request)


async def test_requests_keep_succeeding_while_the_listing_is_slow(
    aiohttp_server: Any, start_llproxy: Start, tmp_path: Path, report: Any
) -> None:
    upstream = SlowLister(model_ids=["steady"], quick_every=1)
    server = await aiohttp_server(upstream.app())
    config = {
        "interval": 1000,
        "timeouts": {"scan": 0.5},
        "discovery": {"forget_after": 3},
        "rate_limit": None,
        "endpoints": [{"hostname": "127.0.0.1", "port_start": server.port}],
    }
    (tmp_path / "c.json").write_text(json.dumps(config))
    daemon = await start_llproxy("--config", str(tmp_path / "c.json"), "--workers", "2")
    body = {"model": "steady", "messages": [{"role": "user", "content": "hi"}]}
    upstream.asked, upstream.quick_every = 0, 3  # two rescans in three time out from now on
    statuses: list[int] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(40):
            async with session.post(f"{daemon.url}/v1/chat/completions", json=body) as resp:
                await resp.read()
                statuses.append(resp.status)
            await asyncio.sleep(0.25)
        scans = upstream.asked
        upstream.quick_every = 0  # now every rescan fails
        started, listed = time.monotonic(), ["steady"]
        while listed and time.monotonic() - started < 20:
            async with session.get(f"{daemon.url}/v1/models") as resp:
                listed = [m["id"] for m in (await resp.json())["data"]]
            await asyncio.sleep(0.2)
    report(
        "slow model listing",
        requests=len(statuses),
        not_200=sum(s != 200 for s in statuses),
        rescans_meanwhile=scans,
        forgotten_after_s=round(time.monotonic() - started, 1),
    )
    assert statuses == [200] * 40 and scans >= 6
    assert listed == []
