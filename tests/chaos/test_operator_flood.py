"""Operators' sockets flooding the desk with commands on a real daemon with workers: an
honest operator's claim, delta and finish must stay fast. Bounded: 10 sockets, 10,000
messages each."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson

from llproxy.stores.sqlite import KeyStore

from ..conftest import UpstreamFactory
from ..operator_client import TestOperator

FLOODERS, MESSAGES = 10, 10_000
HELLO = [{"role": "user", "content": "hello"}]


async def test_a_flooding_socket_does_not_slow_another_operators_claim(
    start_upstream: UpstreamFactory, start_llproxy: Any, tmp_path: Path, report: Any
) -> None:
    upstream = await start_upstream()
    state = tmp_path / "state"
    with KeyStore(state) as store:
        flood_key = store.create("mallory", operator=True)
        honest_key = store.create("alice", operator=True)
    config = tmp_path / "llproxy.json"
    endpoints = [upstream.endpoint(), {"operator": "human", "tags": ["support"]}]
    config.write_text(json.dumps({"endpoints": endpoints}))
    process = await start_llproxy(
        "--config", str(config), "--workers", "2", "--state-dir", str(state)
    )
    url = f"{process.url}/operator/ws"
    junk = orjson.dumps({"type": "delta", "request": "req_nothing", "text": "x" * 1000}).decode()
    async with aiohttp.ClientSession() as session:
        flooders = [
            await session.ws_connect(url, headers={"Authorization": f"Bearer {flood_key}"})
            for _ in range(FLOODERS)
        ]

        async def flood(socket: aiohttp.ClientWebSocketResponse) -> None:
            for _ in range(MESSAGES):
                await socket.send_str(junk)

        flooding = [asyncio.ensure_future(flood(s)) for s in flooders]
        alice = await TestOperator.connect(process.url, honest_key)
        client = openai.AsyncOpenAI(base_url=f"{process.url}/v1", api_key="none", max_retries=0)
        await asyncio.sleep(0.05)  # the flood is under way
        started = time.monotonic()
        asking = asyncio.ensure_future(
            client.chat.completions.create(model="human:support", messages=HELLO)
        )
        request = (await alice.expect("added", timeout=60))["request"]["id"]
        await alice.ok("claim", request)
        await alice.ok("delta", request, text="Still fast.")
        await alice.ok("finish", request)
        answer = await asyncio.wait_for(asking, 60)
        honest = time.monotonic() - started  # from the client's request to its answer
        assert answer.choices[0].message.content == "Still fast."
        sent = sum(1 for f in flooding if f.done())
        for task in flooding:
            task.cancel()
        await asyncio.gather(*flooding, return_exceptions=True)
        # No closing handshake: a paced socket would read its backlog first. The session's
        # end drops the connections.
        await alice.close()
        await client.close()
    report(
        "operator flood",
        flooders=FLOODERS,
        messages_each=MESSAGES,
        flooders_done_sending=sent,
        request_claim_delta_finish_answer_s=round(honest, 2),
    )
    assert honest < 10, f"request → claim → delta → finish → answer took {honest:.1f} s"
