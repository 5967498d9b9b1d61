"""The operators' desk shared by a fleet: two real `llproxy serve` hosts on one real
redis-server, clients of the openai SDK on one host, test operators on the other."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from redis.asyncio import Redis

from llproxy.process.fleet import UNREACHABLE
from llproxy.stores.sqlite import KeyStore

from .conftest import (
    ProxyFactory,
    RunningUpstream,
    UpstreamFactory,
    free_port_block,
    start_redis,
    wait_listening,
)
from .operator_client import TestOperator, open_desk
from .process import LlproxyProcess

HELLO = [{"role": "user", "content": "hello"}]
Start = Callable[..., Awaitable[LlproxyProcess]]


class Fleet:
    def __init__(
        self, hosts: list[LlproxyProcess], keys: dict[str, str], upstream: RunningUpstream
    ) -> None:
        self.hosts = hosts
        self.upstream = upstream
        self.keys = keys
        self.clients: list[openai.AsyncOpenAI] = []
        self.operators: list[TestOperator] = []

    def client(self, host: int) -> openai.AsyncOpenAI:
        url = f"{self.hosts[host].url}/v1"
        client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        self.clients.append(client)
        return client

    async def operator(self, host: int, name: str = "alice") -> TestOperator:
        operator = await TestOperator.connect(self.hosts[host].url, self.keys[name])
        self.operators.append(operator)
        return operator

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        for operator in self.operators:
            await operator.close()


@pytest.fixture
async def fleet(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path, redis_url: str
) -> Any:
    upstream = await start_upstream()
    state = tmp_path / "state"
    with KeyStore(state) as store:
        keys = {name: store.create(name, operator=True) for name in ("alice", "bob")}
    quick = {"operator": "human", "queue_timeout": 1, "idle_timeout": 1}
    endpoints = [
        upstream.endpoint(),
        {"operator": "human", "tags": ["support"]},
        {**quick, "tags": ["quick"], "fallback": "fake-model"},
        {**quick, "tags": ["alone"]},
    ]
    config = tmp_path / "llproxy.json"
    config.write_text(json.dumps({"endpoints": endpoints, "redis_url": redis_url}))
    args = ("--config", str(config), "--workers", "1", "--state-dir", str(state))
    args += ("--graceful-timeout", "3")
    # One after the other: the second's port is picked while the first listens on its own.
    hosts = [await start_llproxy(*args), await start_llproxy(*args)]
    assert hosts[0].port != hosts[1].port
    fleet = Fleet(hosts, keys, upstream)
    await _heard(fleet)
    yield fleet
    await fleet.close()


async def _heard(fleet: Fleet) -> None:
    """Until an operator on each host sees the queue (its host hears the holder)."""
    for host in range(len(fleet.hosts)):
        operator = await fleet.operator(host)
        async with asyncio.timeout(15):
            await operator.expect("stats")
        await operator.close()
        fleet.operators.remove(operator)


async def requeued(operator: TestOperator, request_id: str) -> dict[str, Any]:
    """The request as a new holder has it: in the operator's new snapshot, or added after
    it (each host queues its own requests again, in no order among hosts)."""
    snapshot = await operator.expect("snapshot", timeout=20)
    for request in snapshot["requests"]:
        if request["id"] == request_id:
            return dict(request)
    return dict((await operator.expect("added", timeout=10))["request"])


def holder(fleet: Fleet) -> int:
    holding = [i for i, h in enumerate(fleet.hosts) if "holds the operators' desk" in h.output]
    assert len(holding) == 1, [h.output[-2000:] for h in fleet.hosts]
    return holding[0]


async def test_an_operator_on_one_host_answers_a_client_of_the_other(fleet: Fleet) -> None:
    # Within the scan interval the second host took the first one's scan.
    assert fleet.upstream.fake.listing_requests == 1
    alice, bob = await fleet.operator(0, "alice"), await fleet.operator(1, "bob")
    stream = await fleet.client(1).chat.completions.create(
        model="human:support", messages=HELLO, stream=True
    )
    chunks = stream.__aiter__()
    await anext(chunks)  # the role chunk, at once
    request = (await alice.expect("added"))["request"]
    assert request["messages"] == HELLO
    assert (await bob.expect("added"))["request"]["id"] == request["id"]
    # One claim: of the two hosts' operators racing for it, one wins.
    claims = await asyncio.gather(
        alice.command("claim", request["id"]), bob.command("claim", request["id"])
    )
    assert sorted(c["type"] for c in claims) == ["ack", "refused"], claims
    winner, loser = (alice, bob) if claims[0]["type"] == "ack" else (bob, alice)
    refused = claims[1] if winner is alice else claims[0]
    assert refused["reason"] == f"claimed by {'alice' if winner is alice else 'bob'}"
    await winner.ok("delta", request["id"], text="Across ")
    assert (await anext(chunks)).choices[0].delta.content == "Across "
    await winner.ok("delta", request["id"], text="hosts.")
    await winner.ok("finish", request["id"])
    rest = [chunk async for chunk in chunks]
    assert "".join(c.choices[0].delta.content or "" for c in rest) == "hosts."
    assert rest[-1].choices[0].finish_reason == "stop"
    await loser.expect("removed", request=request["id"], outcome="done")

    # And the other way: a whole answer for a client of the first host.
    asking = asyncio.ensure_future(
        fleet.client(0).chat.completions.create(model="human:support", messages=HELLO)
    )
    request = (await bob.expect("added"))["request"]
    await bob.ok("claim", request["id"])
    await bob.ok("delta", request["id"], text="From the second host.")
    await bob.ok("finish", request["id"])
    answer = await asyncio.wait_for(asking, 10)
    assert answer.choices[0].message.content == "From the second host."


async def test_a_client_that_leaves_withdraws_its_request_on_the_other_host(
    fleet: Fleet,
) -> None:
    alice = await fleet.operator(0)
    stream = await fleet.client(1).chat.completions.create(
        model="human:support", messages=HELLO, stream=True
    )
    await anext(stream.__aiter__())
    request = (await alice.expect("added"))["request"]
    await alice.ok("claim", request["id"])
    await stream.close()
    cancelled = await alice.expect("cancelled", request=request["id"])
    assert cancelled["reason"] == "client left"
    late = await alice.command("delta", request["id"], text="anyone?")
    assert late["type"] == "refused"


async def test_timeouts_and_the_fallback_across_hosts(fleet: Fleet) -> None:
    alice = await fleet.operator(0)
    # Nobody claims it: the fallback model answers the client of the other host.
    answer = await asyncio.wait_for(
        fleet.client(1).chat.completions.create(model="human:quick", messages=HELLO), 15
    )
    assert answer.model == "human:quick" and answer.choices[0].message.content
    timed_out = await alice.expect("timed_out")
    assert timed_out["waited"] == "queue_timeout" and timed_out["fallback"] == "fake-model"
    # Claimed, then silent, without a fallback: 504 for the client, the operator told.
    asking = asyncio.ensure_future(
        fleet.client(1).chat.completions.create(model="human:alone", messages=HELLO)
    )
    request = (await alice.expect("added"))["request"]
    await alice.ok("claim", request["id"])
    with pytest.raises(openai.APIStatusError) as caught:
        await asyncio.wait_for(asking, 15)
    assert caught.value.status_code == 504 and caught.value.code == "operator_timeout"
    assert "sent nothing for 1 s" in caught.value.message
    await alice.expect("timed_out", request=request["id"], waited="idle_timeout")


async def test_a_handoff_on_one_host_has_a_model_answer_the_client_of_the_other(
    fleet: Fleet,
) -> None:
    alice = await fleet.operator(0)
    asking = asyncio.ensure_future(
        fleet.client(1).chat.completions.create(model="human:support", messages=HELLO)
    )
    request = (await alice.expect("added"))["request"]
    await alice.ok("handoff", request["id"], model="fake-model")
    answer = await asyncio.wait_for(asking, 10)
    assert answer.model == "human:support" and answer.choices[0].message.content
    refused = await alice.command("handoff", "req_none", model="no-such-model")
    assert refused["type"] == "refused"


async def test_the_desk_moves_when_its_holder_dies(fleet: Fleet) -> None:
    """The holder is killed: the other host takes the desk (within the lock's TTL), its
    client's request, with the text that reached it, is queued there again, and an
    operator of the surviving host finishes it."""
    dying = holder(fleet)
    surviving = 1 - dying
    alice = await fleet.operator(surviving)
    stream = await fleet.client(surviving).chat.completions.create(
        model="human:support", messages=HELLO, stream=True
    )
    chunks = stream.__aiter__()
    await anext(chunks)
    request = (await alice.expect("added"))["request"]
    await alice.ok("claim", request["id"])
    await alice.ok("delta", request["id"], text="Before. ")
    assert (await anext(chunks)).choices[0].delta.content == "Before. "
    output = len(fleet.hosts[surviving].output)
    os.killpg(fleet.hosts[dying].pid, signal.SIGKILL)  # the whole host
    await fleet.hosts[surviving].wait_for("holds the operators' desk", timeout=20, after=output)
    # A new snapshot: the request is queued again, its text kept; the claim must be taken
    # again.
    snapshot = await alice.expect("snapshot", timeout=15)
    again = next(r for r in snapshot["requests"] if r["id"] == request["id"])
    assert again["state"] == "queued" and again["text"] == "Before. "
    claimed = await alice.ok("claim", request["id"])
    assert claimed["text"] == "Before. "
    await alice.ok("delta", request["id"], text="After.")
    await alice.ok("finish", request["id"])
    rest = [chunk async for chunk in chunks]
    assert "".join(c.choices[0].delta.content or "" for c in rest) == "After."


async def test_a_host_that_dies_takes_its_requests_off_the_desk(fleet: Fleet) -> None:
    """The host holding a client's request is killed: the holder stops hearing it, and
    the operator answering that request is told it is gone."""
    staying = holder(fleet)
    dying = 1 - staying
    alice = await fleet.operator(staying)
    asking = asyncio.ensure_future(
        fleet.client(dying).chat.completions.create(model="human:support", messages=HELLO)
    )
    request = (await alice.expect("added"))["request"]
    await alice.ok("claim", request["id"])
    os.killpg(fleet.hosts[dying].pid, signal.SIGKILL)  # the whole host
    cancelled = await alice.expect("cancelled", timeout=20, request=request["id"])
    assert cancelled["reason"] == "the host holding the client's request is gone"
    with pytest.raises(openai.APIConnectionError):
        await asyncio.wait_for(asking, 10)


async def test_redis_restarted_while_a_request_waits(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Redis goes away and comes back empty: operators are told meanwhile, then each host
    queues its requests again on the new holder, and the answer reaches the client."""
    upstream = await start_upstream()
    port = free_port_block(1)
    url = f"redis://127.0.0.1:{port}/0"
    redis = start_redis(port, tmp_path)
    try:
        await wait_listening(port)
        endpoints = [upstream.endpoint(), {"operator": "human", "tags": ["support"]}]
        desk = await open_desk(start_proxy, tmp_path / "state", endpoints, redis_url=url)
        other = await start_proxy(endpoints, state_dir=str(desk.state), redis_url=url)
        alice = await desk.operator()
        client = other.client(api_key=desk.keys["client"])
        stream = await client.chat.completions.create(
            model="human:support", messages=HELLO, stream=True
        )
        chunks = stream.__aiter__()
        await anext(chunks)
        request = (await alice.expect("added"))["request"]
        await alice.ok("claim", request["id"])
        await alice.ok("delta", request["id"], text="Before. ")
        assert (await anext(chunks)).choices[0].delta.content == "Before. "
        redis.terminate()
        redis.wait(10)
        told = await alice.expect("error", timeout=15)
        assert UNREACHABLE in told["message"]
        assert (await alice.command("delta", request["id"], text="lost"))["type"] == "refused"
        redis = start_redis(port, tmp_path)
        again = await requeued(alice, request["id"])
        assert again["text"] == "Before. "
        await alice.ok("claim", request["id"])
        await alice.ok("delta", request["id"], text="After.")
        await alice.ok("finish", request["id"])
        rest = [chunk async for chunk in chunks]
        assert "".join(c.choices[0].delta.content or "" for c in rest) == "After."
        await alice.close()
    finally:
        redis.terminate()
        redis.wait(10)


async def test_a_stopping_host_answers_within_its_graceful_timeout(fleet: Fleet) -> None:
    """A host that is not the holder stops: a request of its clients claimed on the other
    host is still answered while it drains; one nobody answers ends with 503 when its
    graceful timeout runs out, and the operator is told why."""
    stopping = 1 - holder(fleet)
    alice = await fleet.operator(1 - stopping)
    client = fleet.client(stopping)
    answered = asyncio.ensure_future(
        client.chat.completions.create(model="human:support", messages=HELLO)
    )
    first = (await alice.expect("added"))["request"]
    interrupted = asyncio.ensure_future(
        client.chat.completions.create(model="human:support", messages=HELLO)
    )
    second = (await alice.expect("added"))["request"]
    await alice.ok("claim", first["id"])
    fleet.hosts[stopping].signal(signal.SIGTERM)
    await alice.ok("delta", first["id"], text="While it drains.")
    await alice.ok("finish", first["id"])
    answer = await asyncio.wait_for(answered, 10)
    assert answer.choices[0].message.content == "While it drains."
    with pytest.raises(openai.APIStatusError) as failed:
        await asyncio.wait_for(interrupted, 20)
    assert failed.value.status_code == 503
    assert failed.value.code == "operator_interrupted"  # type: ignore[attr-defined]
    cancelled = await alice.expect("cancelled", request=second["id"])
    assert cancelled["reason"] == "the server holding the client's request restarted"
    assert await fleet.hosts[stopping].wait_exit(30) == 0


async def test_a_holder_that_stops_hands_the_desk_on(fleet: Fleet) -> None:
    """The holder stops: it releases its lock, the other host takes the desk within a
    beat or two, and its waiting request is answered there."""
    stopping = holder(fleet)
    staying = 1 - stopping
    alice = await fleet.operator(staying)
    asking = asyncio.ensure_future(
        fleet.client(staying).chat.completions.create(model="human:support", messages=HELLO)
    )
    request = (await alice.expect("added"))["request"]
    output = len(fleet.hosts[staying].output)
    fleet.hosts[stopping].signal(signal.SIGTERM)
    assert await fleet.hosts[stopping].wait_exit(30) == 0
    await fleet.hosts[staying].wait_for("holds the operators' desk", timeout=10, after=output)
    assert (await requeued(alice, request["id"]))["state"] == "queued"
    await alice.ok("claim", request["id"])
    await alice.ok("delta", request["id"], text="Moved.")
    await alice.ok("finish", request["id"])
    answer = await asyncio.wait_for(asking, 10)
    assert answer.choices[0].message.content == "Moved."


async def test_subscriptions_cut_while_redis_stays_up(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory, tmp_path: Path, redis_url: str
) -> None:
    """Redis drops every subscription (as it does a slow reader's): the holder gives the
    desk up, a holder is elected again, each host queues its requests again with what
    reached their clients, and the answer goes on."""
    upstream = await start_upstream()
    endpoints = [upstream.endpoint(), {"operator": "human", "tags": ["support"]}]
    desk = await open_desk(start_proxy, tmp_path / "state", endpoints, redis_url=redis_url)
    other = await start_proxy(endpoints, state_dir=str(desk.state), redis_url=redis_url)
    alice = await desk.operator()
    client = other.client(api_key=desk.keys["client"])
    stream = await client.chat.completions.create(
        model="human:support", messages=HELLO, stream=True
    )
    chunks = stream.__aiter__()
    await anext(chunks)
    request = (await alice.expect("added"))["request"]
    await alice.ok("claim", request["id"])
    await alice.ok("delta", request["id"], text="Before. ")
    assert (await anext(chunks)).choices[0].delta.content == "Before. "
    redis = Redis.from_url(redis_url)
    try:
        assert await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 2
    finally:
        await redis.aclose()
    again = await requeued(alice, request["id"])
    assert again["text"] == "Before. " and again["state"] == "queued"
    await alice.ok("claim", request["id"])
    await alice.ok("delta", request["id"], text="After.")
    await alice.ok("finish", request["id"])
    rest = [chunk async for chunk in chunks]
    assert "".join(c.choices[0].delta.content or "" for c in rest) == "After."
    await alice.close()
