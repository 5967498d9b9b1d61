"""The fleet's desk in one test process: two hosts sharing a real Redis, and its Redis
down (a request for an operator still times out and takes its fallback on its own host,
and an operator's command is refused at once)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
from redis.asyncio import Redis

from llproxy.core.desk import Ticket
from llproxy.process.channel import DeskSubmit
from llproxy.process.fleet import UNREACHABLE, decode, encode, queued_again
from llproxy.process.fleet_scan import SCAN_RESULT

from .conftest import ProxyFactory, UpstreamFactory
from .operator_client import TestOperator, open_desk

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


async def test_two_hosts_in_one_process_share_the_desk(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory, tmp_path: Path, redis_url: str
) -> None:
    """Two hosts on one Redis (two apps here, for speed; test_fleet_desk.py runs real
    processes): an operator of each sees a client's request of the other, one claim wins,
    and the answer goes back delta by delta."""
    upstream = await start_upstream()
    endpoints = [upstream.endpoint(), {"operator": "human", "tags": ["support"]}]
    operators = {"alice": (), "bob": ()}
    desk = await open_desk(
        start_proxy, tmp_path / "state", endpoints, upstream, operators, redis_url=redis_url
    )
    other = await start_proxy(endpoints, state_dir=str(desk.state), redis_url=redis_url)
    alice = await desk.operator("alice")
    bob = await TestOperator.connect(other.url, desk.keys["bob"])
    stream = await other.client(api_key=desk.keys["client"]).chat.completions.create(
        model="human:support", messages=HELLO, stream=True
    )
    chunks = stream.__aiter__()
    await anext(chunks)
    request = (await alice.expect("added"))["request"]
    claims = await asyncio.gather(
        alice.command("claim", request["id"]), bob.command("claim", request["id"])
    )
    assert sorted(c["type"] for c in claims) == ["ack", "refused"], claims
    winner = alice if claims[0]["type"] == "ack" else bob
    await winner.ok("delta", request["id"], text="One ")
    assert (await anext(chunks)).choices[0].delta.content == "One "
    await winner.ok("delta", request["id"], text="desk.")
    await winner.ok("finish", request["id"])
    rest = [chunk async for chunk in chunks]
    assert "".join(c.choices[0].delta.content or "" for c in rest) == "desk."
    for operator in (alice, bob):
        await operator.expect("removed", request=request["id"], outcome="done")
        await operator.close()


def test_a_ticket_from_a_newer_host_is_read_without_the_fields_it_added() -> None:
    """Hosts of a fleet are upgraded one by one: a field this version does not know is
    dropped, not a reason to lose the request."""
    ticket = Ticket(
        id="req_1",
        model="human:support",
        asked="human:support",
        client="k",
        dialect="openai",
        stream=True,
        messages=HELLO,
        tools=[],
        tool_choice=None,
        max_tokens=None,
        queue_timeout=5,
        idle_timeout=5,
        fallback=None,
        max_answer_bytes=100,
    )
    ticket.add_text("so far")
    document = orjson.loads(encode("host-b", DeskSubmit(queued_again(ticket))))
    document["ticket"]["added_later"] = {"x": 1}
    host, message = decode(orjson.dumps(document), {"DeskSubmit": DeskSubmit})
    assert host == "host-b" and isinstance(message, DeskSubmit)
    assert message.ticket.text == "so far" and message.ticket.answer_bytes == 6
    assert message.ticket.messages == HELLO and message.ticket.state == "queued"


async def test_one_host_scans_for_the_fleet(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory, tmp_path: Path, redis_url: str
) -> None:
    """A host that starts within another's scan interval takes that scan (its own
    upstream keys, which never go to Redis); one with other endpoints scans itself."""
    upstream = await start_upstream()
    endpoint = upstream.endpoint(apikey="env:TEST_KEY")
    top = {"redis_url": redis_url, "interval": 60000, "state_dir": str(tmp_path / "s")}
    await start_proxy([endpoint], **top)
    assert upstream.fake.listing_requests == 1
    second = await start_proxy([endpoint], **top)
    assert upstream.fake.listing_requests == 1  # the first host's scan
    answer = await second.client().chat.completions.create(model="fake-model", messages=HELLO)
    assert answer.choices[0].message.content
    assert upstream.fake.generation_requests[-1].headers["Authorization"] == "Bearer sk-up-7"
    redis = Redis.from_url(redis_url)
    try:
        stored = await redis.get(SCAN_RESULT)
    finally:
        await redis.aclose()
    assert stored is not None and b"fake-model" in stored and b"sk-up-7" not in stored
    await start_proxy([{**endpoint, "tags": ["other"]}], **top)
    assert upstream.fake.listing_requests == 2
