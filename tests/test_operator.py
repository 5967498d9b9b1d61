"""A person answers as a model: clients of the openai and anthropic SDKs on one side, a
test operator on the operator WebSocket on the other, a real llproxy between them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llproxy.stores.sqlite import DATABASE, KeyStore

from .conftest import ProxyFactory, UpstreamFactory, recorded
from .operator_client import WEATHER, Desk, TestOperator, open_desk
from .process import create_key, run_cli

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def desk(start_upstream: UpstreamFactory, start_proxy: ProxyFactory, tmp_path: Path) -> Desk:
    upstream = await start_upstream()
    state = tmp_path / "state"
    alice = create_key(state, "alice", "--operator")  # as a user makes one
    operator: dict[str, Any] = {"operator": "human", "tags": ["support"], "fallback": "fake-model"}
    quick = {"operator": "human", "tags": ["quick"], "queue_timeout": 0.6, "idle_timeout": 0.6}
    endpoints = [
        upstream.endpoint(),
        operator,
        {**quick, "fallback": "fake-model"},
        {**quick, "tags": ["alone"]},
    ]
    operators = {"bob": ("human*",), "carol": ("robot*",)}
    desk = await open_desk(start_proxy, state, endpoints, upstream, operators)
    desk.keys["alice"] = alice
    return desk


async def test_operator_models_are_listed_and_guarded(desk: Desk) -> None:
    models = {m.id: m for m in (await desk.client().models.list()).data}
    assert models["human:support"].owned_by == "llproxy-operator"
    assert {"human:quick", "human:alone", "fake-model"} <= set(models)
    # An operator key calls no model; a client key opens no operator socket.
    operator_client = desk.proxy.client(api_key=desk.keys["alice"])
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await operator_client.models.list()
    assert refused.value.code == "operator_key"
    for headers in (
        {"Authorization": f"Bearer {desk.keys['client']}"},
        {"Authorization": "Bearer llp-not-a-key"},
    ):
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await session.ws_connect(f"{desk.proxy.url}/operator/ws", headers=headers)
        assert caught.value.status == 401
    # Without a header the first message must carry an operator key; else the socket
    # closes with 4401 and nothing else is said.
    for first in ({"type": "auth", "token": desk.keys["client"]}, {"type": "claim"}, "x"):
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{desk.proxy.url}/operator/ws") as socket,
        ):
            await socket.send_json(first)
            message = await socket.receive(timeout=10)
            assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 4401
    browser_like = await desk.operator("alice", in_header=False)
    await browser_like.close()


async def test_a_stream_arrives_while_the_operator_types(desk: Desk) -> None:
    alice = await desk.operator()
    stream = await desk.client().chat.completions.create(
        model="human:support", messages=HELLO, stream=True
    )
    chunks = stream.__aiter__()
    opening = await anext(chunks)  # at once, before any operator came
    assert opening.choices[0].delta.role == "assistant"
    added = (await alice.expect("added"))["request"]
    assert added["messages"] == HELLO and added["model"] == "human:support"
    assert added["stream"] is True and added["dialect"] == "openai" and added["client"] == "client"
    request = added["id"]
    assert (await alice.ok("claim", request))["text"] == ""
    await alice.ok("delta", request, text="Hel", offset=0)
    assert (await anext(chunks)).choices[0].delta.content == "Hel"  # before the rest is typed
    # A delta sent again with what came before it: only what is new reaches the client.
    assert (await alice.ok("delta", request, text="Hello", offset=0))["length"] == 5
    assert (await anext(chunks)).choices[0].delta.content == "lo"
    gap = await alice.command("delta", request, text="!", offset=9)
    assert gap["type"] == "refused" and "past the 5 characters" in gap["reason"]
    await alice.ok("delta", request, text=", world", offset=5)
    await alice.ok("finish", request)
    rest = [chunk async for chunk in chunks]
    assert "".join(c.choices[0].delta.content or "" for c in rest) == ", world"
    assert rest[-1].choices[0].finish_reason == "stop"
    assert (await alice.expect("removed", request=request))["outcome"] == "done"
    rows = await recorded(desk.state, "model", 1)
    assert rows == [
        {
            "model": "human:support",
            "requests": 1,
            "prompt_tokens": None,
            "completion_tokens": None,
            "cut": 0,
        }
    ]
    with sqlite3.connect(desk.state / DATABASE) as db:
        assert db.execute("SELECT upstream, status FROM usage").fetchall() == [
            ("operator:alice", 200)
        ]
    await alice.close()


async def test_an_anthropic_client_and_tool_calls_checked_against_the_schema(desk: Desk) -> None:
    alice = await desk.operator()
    claude = anthropic.AsyncAnthropic(
        base_url=desk.proxy.url, api_key=desk.keys["client"], max_retries=0
    )
    tool = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}  # type: ignore[index]

    async def ask() -> anthropic.types.Message:
        async with claude.messages.stream(
            model="human:support", max_tokens=100, messages=HELLO, tools=[tool]
        ) as events:
            return await events.get_final_message()

    asking = asyncio.ensure_future(ask())
    request = (await alice.expect("added"))["request"]
    assert request["dialect"] == "anthropic"
    assert request["tools"][0]["function"]["name"] == "get_weather"
    await alice.ok("claim", request["id"])
    await alice.ok("delta", request["id"], text="Let me look.")
    for bad, why in (
        ({"days": 2}, "'city' is a required property"),
        ({"city": 7}, "city: 7 is not of type 'string'"),
        ({"city": "Oslo", "when": "now"}, "Additional properties are not allowed"),
    ):
        refused = await alice.command("tool_call", request["id"], name="get_weather", arguments=bad)
        assert refused["type"] == "refused" and why in refused["reason"], refused
    unknown = await alice.command("tool_call", request["id"], name="rm", arguments={})
    assert "no tool 'rm'" in unknown["reason"]
    await alice.ok("tool_call", request["id"], name="get_weather", arguments={"city": "Oslo"})
    assert (await alice.ok("finish", request["id"]))["reason"] == "tool_calls"
    message = await asyncio.wait_for(asking, 10)
    await claude.close()
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[1].input == {"city": "Oslo"}  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"
    await alice.close()


async def test_a_reject_reaches_the_client_in_its_dialect(desk: Desk) -> None:
    alice = await desk.operator()
    asking = asyncio.ensure_future(
        desk.client().chat.completions.create(model="human:support", messages=HELLO)
    )
    request = (await alice.expect("added"))["request"]["id"]
    await alice.ok("reject", request, message="not something I answer")
    with pytest.raises(openai.BadRequestError) as caught:
        await asyncio.wait_for(asking, 10)
    assert caught.value.code == "rejected_by_operator"
    assert "not something I answer" in caught.value.message
    assert caught.value.response.headers["x-should-retry"] == "false"
    await alice.close()


async def test_two_operators_race_for_one_claim(desk: Desk) -> None:
    alice, bob, carol = (
        await desk.operator("alice"),
        await desk.operator("bob"),
        await desk.operator("carol"),
    )
    asking = asyncio.ensure_future(
        desk.client().chat.completions.create(model="human:support", messages=HELLO)
    )
    request = (await alice.expect("added"))["request"]["id"]
    await bob.expect("added")
    answers = await asyncio.gather(alice.command("claim", request), bob.command("claim", request))
    won = [a for a in answers if a["type"] == "ack"]
    lost = [a for a in answers if a["type"] == "refused"]
    assert len(won) == 1 and len(lost) == 1
    winner = alice if answers[0]["type"] == "ack" else bob
    assert lost[0]["reason"] == f"claimed by {'alice' if winner is alice else 'bob'}"
    # carol's key covers robot* models only: she saw nothing and may claim nothing.
    assert [e for e in carol.events if e["type"] == "added"] == []
    assert (await carol.command("claim", request))["type"] == "refused"
    await winner.ok("delta", request, text="Mine.")
    await winner.ok("finish", request)
    answer = await asyncio.wait_for(asking, 10)
    assert answer.choices[0].message.content == "Mine."
    for operator in (alice, bob, carol):
        await operator.close()


async def test_an_operator_leaves_and_another_finishes(desk: Desk) -> None:
    alice, bob = await desk.operator("alice"), await desk.operator("bob")
    stream = await desk.client().chat.completions.create(
        model="human:support", messages=HELLO, stream=True
    )
    chunks = stream.__aiter__()
    await anext(chunks)
    request = (await alice.expect("added"))["request"]["id"]
    # Every change of a deadline tells it: the idle one of a claim (renewed by each
    # action), the queue's again once released.
    claim = await alice.ok("claim", request)
    assert 0 < claim["deadline_in"] <= 120
    assert 0 < (await bob.expect("claimed", request=request))["deadline_in"] <= 120
    await alice.ok("delta", request, text="Half an ")
    assert (await anext(chunks)).choices[0].delta.content == "Half an "
    await alice.close()
    released = await bob.expect("released", request=request)
    assert released["by"] == "alice" and released["reason"] == "operator left"
    assert 120 < released["deadline_in"] <= 300
    claimed = await bob.ok("claim", request)
    assert claimed["text"] == "Half an "  # bob goes on from there
    again = await bob.ok("claim", request)  # a claim held already: the same answer
    assert again["text"] == "Half an " and again["tool_calls"] == []
    await bob.ok("delta", request, text="answer.", offset=8)
    await bob.ok("finish", request)
    rest = [chunk async for chunk in chunks]
    assert "".join(c.choices[0].delta.content or "" for c in rest) == "answer."
    await bob.close()


@pytest.mark.parametrize("stream", [True, False])
async def test_a_queue_timeout_hands_the_request_to_the_fallback(desk: Desk, stream: bool) -> None:
    alice = await desk.operator()
    client = desk.client()
    if stream:
        reply = await client.chat.completions.create(
            model="human:quick", messages=HELLO, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in reply if c.choices])
    else:
        whole = await client.chat.completions.create(model="human:quick", messages=HELLO)
        text = whole.choices[0].message.content or ""
        assert whole.model == "human:quick"
    assert text.strip() == "w0 w1 w2 w3 w4"  # the fake upstream's answer
    assert desk.upstream.fake.generation_requests[-1].body["messages"] == HELLO
    warned = await alice.expect("deadline")  # a tick (0.5 s) before a short timeout
    assert 0 < warned["in"] <= 0.5
    timed_out = await alice.expect("timed_out", request=warned["request"])
    assert timed_out["waited"] == "queue_timeout" and timed_out["fallback"] == "fake-model"
    # Without a fallback: a timeout the SDK must not retry.
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="human:alone", messages=HELLO)
    assert caught.value.status_code == 504 and caught.value.code == "operator_timeout"
    assert caught.value.response.headers["x-should-retry"] == "false"
    await alice.close()


async def test_handoff_replaces_or_continues(desk: Desk) -> None:
    alice = await desk.operator()
    client = desk.client()
    asking = asyncio.ensure_future(
        client.chat.completions.create(model="human:support", messages=HELLO)
    )
    request = (await alice.expect("added"))["request"]["id"]
    await alice.ok("claim", request)
    bad = await alice.command("handoff", request, model="no-such-model")
    assert bad["type"] == "refused" and "no model" in bad["reason"]
    await alice.ok("handoff", request, model="fake-model", mode="replace")
    answer = await asyncio.wait_for(asking, 10)
    assert answer.choices[0].message.content == "w0 w1 w2 w3 w4"
    assert answer.model == "human:support"

    stream = await client.chat.completions.create(
        model="human:support", messages=HELLO, stream=True
    )
    chunks = stream.__aiter__()
    await anext(chunks)
    request = (await alice.expect("added"))["request"]["id"]
    await alice.ok("claim", request)
    await alice.ok("delta", request, text="Well, ")
    late = await alice.command("handoff", request, model="fake-model", mode="replace")
    assert late["type"] == "refused" and "mode continue" in late["reason"]
    await alice.ok("handoff", request, model="fake-model", mode="continue")
    rest = [chunk async for chunk in chunks]
    text = "".join(c.choices[0].delta.content or "" for c in rest if c.choices)
    assert text == "Well, w0 w1 w2 w3 w4 "
    assert all(c.model == "human:support" for c in rest)
    sent = desk.upstream.fake.generation_requests[-1].body["messages"]
    assert sent == [*HELLO, {"role": "assistant", "content": "Well, "}]
    # A client without a stream never saw the operator's part: its answer starts with it.
    asking = asyncio.ensure_future(
        client.chat.completions.create(model="human:support", messages=HELLO)
    )
    request = (await alice.expect("added"))["request"]["id"]
    await alice.ok("claim", request)
    await alice.ok("delta", request, text="Well, ")
    await alice.ok("handoff", request, model="fake-model", mode="continue")
    answer = await asyncio.wait_for(asking, 10)
    assert answer.choices[0].message.content == "Well, w0 w1 w2 w3 w4"
    await alice.close()


async def test_a_client_leaving_is_told_to_the_operator(desk: Desk) -> None:
    alice = await desk.operator()
    body = {"model": "human:support", "messages": HELLO, "stream": True}
    headers = {"Authorization": f"Bearer {desk.keys['client']}"}
    for answered in (False, True):
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{desk.proxy.url}/v1/chat/completions", json=body, headers=headers
            ) as resp,
        ):
            await resp.content.readline()  # the opening chunk
            request = (await alice.expect("added"))["request"]["id"]
            if answered:
                await alice.ok("claim", request)
                await alice.ok("delta", request, text="Hi")
        cancelled = await alice.expect("cancelled", request=request)
        assert cancelled["reason"] == "client left"
        late = await alice.command("delta", request, text="?")
        assert late["type"] == "refused"
    await alice.close()


async def test_client_and_operator_on_different_workers(
    start_upstream: UpstreamFactory, start_llproxy: Any, tmp_path: Path
) -> None:
    """The desk is the master's: a request held by one worker is answered by an operator
    whose socket another worker holds, delta by delta."""
    upstream = await start_upstream()
    state = tmp_path / "state"
    with KeyStore(state) as store:
        key = store.create("alice", operator=True)
    config = tmp_path / "llproxy.json"
    endpoints = [upstream.endpoint(), {"operator": "human", "tags": ["support"]}]
    config.write_text(json.dumps({"endpoints": endpoints}))
    process = await start_llproxy(
        "--config", str(config), "--workers", "2", "--state-dir", str(state)
    )
    # Sockets land on whichever worker accepts them: open some until both workers hold one.
    operators: dict[int, TestOperator] = {}
    spare: list[TestOperator] = []
    for _ in range(40):
        operator = await TestOperator.connect(process.url, key)
        worker = operator.events[0]["worker"]
        if worker in operators:
            spare.append(operator)
        else:
            operators[worker] = operator
        if len(operators) == 2:
            break
    assert len(operators) == 2, "every socket landed on one worker"
    client = openai.AsyncOpenAI(base_url=f"{process.url}/v1", api_key="none", max_retries=0)
    stream = await client.chat.completions.create(
        model="human:support", messages=HELLO, stream=True
    )
    chunks = stream.__aiter__()
    await anext(chunks)
    first = next(iter(operators.values()))
    request = (await first.expect("added"))["request"]
    other = next(op for worker, op in operators.items() if worker != request["worker"])
    await other.ok("claim", request["id"])
    await other.ok("delta", request["id"], text="From another ")
    assert (await anext(chunks)).choices[0].delta.content == "From another "
    await other.ok("delta", request["id"], text="worker.")
    await other.ok("finish", request["id"])
    rest = [chunk async for chunk in chunks]
    assert "".join(c.choices[0].delta.content or "" for c in rest) == "worker."
    await client.close()
    rows = await recorded(state, "model", 1)
    assert rows[0]["model"] == "human:support"
    # The desk's numbers are the master's, whichever worker answers the scrape.
    samples = await _metrics(process.url)
    support = (("model", "human:support"),)
    assert samples[("llproxy_operator_finished_total", support)] == 1
    assert samples[("llproxy_operator_claims_total", support)] == 1
    assert samples[("llproxy_operators_online", ())] == 1
    for operator in [*operators.values(), *spare]:
        await operator.close()


async def test_an_operator_takes_their_claim_over_to_a_new_connection(desk: Desk) -> None:
    """After a reconnect the old socket may linger until the server notices it is dead:
    the same operator claims again at once, and the old one holds nothing."""
    old = await desk.operator("alice")
    asking = asyncio.ensure_future(
        desk.client().chat.completions.create(model="human:support", messages=HELLO)
    )
    request = (await old.expect("added"))["request"]["id"]
    await old.ok("claim", request)
    await old.ok("delta", request, text="Before ")
    new = await desk.operator("alice")
    assert new.events[1]["claims"] == [request]  # the snapshot says whose it is
    taken = await new.ok("claim", request)
    assert taken["text"] == "Before " and taken["deadline_in"] > 0
    stale = await old.command("delta", request, text="stale")
    assert stale["type"] == "refused"
    bob = await desk.operator("bob")
    assert (await bob.command("claim", request))["reason"] == "claimed by alice"
    await new.ok("delta", request, text="after.", offset=7)
    await new.ok("finish", request)
    answer = await asyncio.wait_for(asking, 10)
    assert answer.choices[0].message.content == "Before after."
    for operator in (old, new, bob):
        await operator.close()


async def test_finish_and_tool_calls_are_checked_against_the_request(desk: Desk) -> None:
    """The client must get what it asked for: no tool_calls finish without a call, no
    tool call when tool_choice is none, no other tool than the one it names."""
    alice = await desk.operator()
    lookup: Any = {"type": "function", "function": {"name": "lookup", "parameters": {}}}
    tools = [WEATHER, lookup]

    async def ask(tool_choice: Any) -> tuple[asyncio.Future[Any], str]:
        asking = asyncio.ensure_future(
            desk.client().chat.completions.create(
                model="human:support", messages=HELLO, tools=tools, tool_choice=tool_choice
            )
        )
        request = (await alice.expect("added"))["request"]["id"]
        await alice.ok("claim", request)
        return asking, request

    asking, request = await ask("auto")
    refused = await alice.command("finish", request, reason="tool_calls")
    assert "call a tool first" in refused["reason"], refused
    await alice.ok("delta", request, text="No tools needed.")
    await alice.ok("finish", request)
    assert (await asyncio.wait_for(asking, 10)).choices[0].finish_reason == "stop"

    asking, request = await ask("none")
    refused = await alice.command("tool_call", request, name="lookup", arguments={})
    assert "tool_choice is none" in refused["reason"], refused
    await alice.ok("delta", request, text="Text only.")
    await alice.ok("finish", request)
    answer = await asyncio.wait_for(asking, 10)
    assert answer.choices[0].message.tool_calls is None

    named = {"type": "function", "function": {"name": "get_weather"}}
    asking, request = await ask(named)
    refused = await alice.command("finish", request)
    assert "requires a tool call" in refused["reason"], refused
    refused = await alice.command("tool_call", request, name="lookup", arguments={})
    assert "names 'get_weather'" in refused["reason"], refused
    await alice.ok("tool_call", request, name="get_weather", arguments={"city": "Oslo"})
    assert (await alice.ok("finish", request))["reason"] == "tool_calls"
    answer = await asyncio.wait_for(asking, 10)
    calls = answer.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather"]  # type: ignore[union-attr]
    await alice.close()


async def _close_of(socket: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    """The close code and reason the server ends a socket with (other frames skipped)."""
    async with asyncio.timeout(20):  # a revocation is seen within ~3 s: generous
        while True:
            message = await socket.receive()
            if message.type == aiohttp.WSMsgType.CLOSE:
                return message.data, str(message.extra)
            if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return socket.close_code, ""


async def test_a_revoked_or_expired_key_closes_open_sockets_on_every_worker(
    start_upstream: UpstreamFactory, start_llproxy: Any, tmp_path: Path
) -> None:
    """Revoked with `llproxy keys revoke`, a key's sockets close on every worker (4401,
    the reason says why) and its claim goes back to the queue; an expiring key's socket
    closes once it expires."""
    upstream = await start_upstream()
    state = tmp_path / "state"
    with KeyStore(state) as store:
        alice = store.create("alice", operator=True)
        bob = store.create("bob", operator=True)
        dave = store.create("dave", operator=True, expires=time.time() + 8)
    config = tmp_path / "llproxy.json"
    endpoints = [upstream.endpoint(), {"operator": "human", "tags": ["support"]}]
    config.write_text(json.dumps({"endpoints": endpoints}))
    process = await start_llproxy(
        "--config", str(config), "--workers", "2", "--state-dir", str(state)
    )
    headers = {"Authorization": f"Bearer {alice}"}
    async with aiohttp.ClientSession() as session:
        expiring = await session.ws_connect(
            f"{process.url}/operator/ws", headers={"Authorization": f"Bearer {dave}"}
        )
        sockets: dict[int, aiohttp.ClientWebSocketResponse] = {}
        for _ in range(40):  # sockets land on either worker: open some until both hold one
            socket = await session.ws_connect(f"{process.url}/operator/ws", headers=headers)
            hello = await socket.receive_json(timeout=10)
            await socket.receive_json(timeout=10)  # the snapshot
            if hello["worker"] in sockets:
                await socket.close()
            else:
                sockets[hello["worker"]] = socket
            if len(sockets) == 2:
                break
        assert len(sockets) == 2, "every socket landed on one worker"
        watcher = await TestOperator.connect(process.url, bob)
        client = openai.AsyncOpenAI(base_url=f"{process.url}/v1", api_key="none", max_retries=0)
        asking = asyncio.ensure_future(
            client.chat.completions.create(model="human:support", messages=HELLO)
        )
        request = (await watcher.expect("added"))["request"]["id"]
        claimer = next(iter(sockets.values()))
        await claimer.send_json({"type": "claim", "request": request, "id": 1})
        await watcher.expect("claimed", request=request, by="alice")
        revoked = await asyncio.to_thread(run_cli, "keys", "revoke", "alice", state=state)
        assert revoked.returncode == 0, revoked.stderr
        closes = await asyncio.gather(*(_close_of(s) for s in sockets.values()))
        assert closes == [(4401, "the operator key was revoked")] * 2
        await watcher.expect("released", request=request, by="alice")
        # A new socket is refused as well, and the request is still there to answer.
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await session.ws_connect(f"{process.url}/operator/ws", headers=headers)
        await watcher.ok("claim", request)
        await watcher.ok("delta", request, text="Bob here.")
        await watcher.ok("finish", request)
        answer = await asyncio.wait_for(asking, 10)
        assert answer.choices[0].message.content == "Bob here."
        await client.close()

        assert await _close_of(expiring) == (4401, "the operator key expired")
        await watcher.close()


async def test_an_ollama_stream_gets_its_headers_while_the_operator_is_awaited(
    desk: Desk,
) -> None:
    """NDJSON has no keepalive and the operator's opening chunk translates to no line:
    the status and headers still go at once, so the client knows its request is taken."""
    alice = await desk.operator()
    body = {"model": "human:support", "messages": HELLO, "stream": True}
    headers = {"Authorization": f"Bearer {desk.keys['client']}"}
    async with aiohttp.ClientSession() as session:
        # Nobody has claimed it: the headers come all the same (a bound on a hang).
        response = await asyncio.wait_for(
            session.post(f"{desk.proxy.url}/api/chat", json=body, headers=headers), 10
        )
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        request = (await alice.expect("added"))["request"]["id"]
        await alice.ok("claim", request)
        await alice.ok("delta", request, text="Hej")
        first = json.loads(await asyncio.wait_for(response.content.readline(), 10))
        assert first["message"]["content"] == "Hej" and first["done"] is False
        await alice.ok("finish", request)
        last = json.loads((await response.read()).splitlines()[-1])
        assert last["done"] is True and last["done_reason"] == "stop"
        response.release()
    await alice.close()


async def test_a_waiting_request_does_not_outlive_the_graceful_timeout_of_a_reload(
    start_upstream: UpstreamFactory, start_llproxy: Any, tmp_path: Path
) -> None:
    """SIGHUP with --graceful-timeout 2: requests still waiting for a person end with 503
    operator_interrupted once the 2 s run out (a stream with an error event), an operator
    on the new worker is told why, and the old worker exits."""
    upstream = await start_upstream()
    state = tmp_path / "state"
    with KeyStore(state) as store:
        key = store.create("alice", operator=True)
    config = tmp_path / "llproxy.json"
    endpoints = [upstream.endpoint(), {"operator": "human", "tags": ["support"]}]
    config.write_text(json.dumps({"endpoints": endpoints}))
    process = await start_llproxy(
        "--config",
        str(config),
        "--workers",
        "1",
        "--state-dir",
        str(state),
        "--graceful-timeout",
        "2",
    )
    client = openai.AsyncOpenAI(base_url=f"{process.url}/v1", api_key="none", max_retries=0)
    asking = asyncio.ensure_future(
        client.chat.completions.create(model="human:support", messages=HELLO)
    )
    stream = await client.chat.completions.create(
        model="human:support", messages=HELLO, stream=True
    )
    chunks = stream.__aiter__()
    await anext(chunks)
    before = await TestOperator.connect(process.url, key)
    seen = {r["id"] for r in before.events[1]["requests"]}
    while len(seen) < 2:  # both requests are on the desk
        seen.add((await before.expect("added"))["request"]["id"])
    mark = len(process.output)
    process.signal(signal.SIGHUP)
    await process.wait_for("reloaded", after=mark)
    old_worker = before.events[0]["worker"]
    for _ in range(40):  # the old worker may take a connection before it stops accepting
        with contextlib.suppress(AssertionError):
            after = await TestOperator.connect(process.url, key)
            if after.events[0]["worker"] != old_worker:
                break
            await after.close()
        await asyncio.sleep(0.1)
    assert after.events[0]["worker"] != old_worker
    assert len(after.events[1]["requests"]) == 2  # the desk (the master's) kept them
    with pytest.raises(openai.APIStatusError) as failed:
        await asyncio.wait_for(asking, 20)
    assert failed.value.status_code == 503
    assert failed.value.code == "operator_interrupted"  # type: ignore[attr-defined]
    with pytest.raises(openai.APIError) as broken:
        async with asyncio.timeout(20):
            async for _ in chunks:
                pass
    assert "graceful timeout" in str(broken.value)
    for _ in range(2):
        cancelled = await after.expect("cancelled")
        assert cancelled["reason"] == "the server holding the client's request restarted"
    await process.wait_for("still waiting for an operator", after=mark)
    await client.close()
    await before.close()
    await after.close()


async def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as samples: (name, sorted labels) → value."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        return _samples(await response.text())


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_desk_metrics_equal_a_known_sequence(desk: Desk) -> None:
    """/metrics after claims, a release, a finish, a reject, a handoff, a queue timeout
    with a fallback and an idle timeout without one: every count as it happened."""
    alice = await desk.operator()
    client = desk.client()

    def ask(model: str) -> asyncio.Future[Any]:
        return asyncio.ensure_future(client.chat.completions.create(model=model, messages=HELLO))

    async def arrives(model: str) -> tuple[asyncio.Future[Any], str]:
        asking = ask(model)
        return asking, (await alice.expect("added"))["request"]["id"]

    asking, request = await arrives("human:support")  # claimed and finished
    await alice.ok("claim", request)
    await alice.ok("delta", request, text="Hi")
    await alice.ok("finish", request)
    await asyncio.wait_for(asking, 10)
    asking, request = await arrives("human:support")  # claimed twice, then rejected
    await alice.ok("claim", request)
    await alice.ok("release", request)
    await alice.ok("claim", request)
    await alice.ok("reject", request, message="no")
    with pytest.raises(openai.BadRequestError):
        await asyncio.wait_for(asking, 10)
    asking, request = await arrives("human:support")  # handed off unclaimed
    await alice.ok("handoff", request, model="fake-model")
    await asyncio.wait_for(asking, 10)
    asking, request = await arrives("human:quick")  # nobody claims: the fallback answers
    await alice.expect("timed_out", request=request)
    await asyncio.wait_for(asking, 10)
    asking, request = await arrives("human:alone")  # claimed, then silence: a 504
    await alice.ok("claim", request)
    await alice.expect("timed_out", request=request)
    with pytest.raises(openai.APIStatusError) as idle:
        await asyncio.wait_for(asking, 10)
    # Someone claimed it: the error does not say nobody came.
    assert "the operator who claimed the request sent nothing for 0.6 s" in idle.value.message
    assert "no operator" not in idle.value.message
    waiting, _ = await arrives("human:support")  # still in the queue at the scrape
    bob = await desk.operator("bob")  # two people online; bob hears the numbers at once
    stats = await bob.expect("stats")
    assert (stats["waiting"], stats["operators_online"]) == (1, 2)
    assert 0 <= stats["oldest_wait"] < 60

    samples = await _metrics(desk.proxy.url)
    support = (("model", "human:support"),)
    quick, alone = (("model", "human:quick"),), (("model", "human:alone"),)
    expected = {
        ("llproxy_operator_queue_depth", support): 1,
        ("llproxy_operators_online", ()): 2,
        ("llproxy_operator_claims_total", support): 3,
        ("llproxy_operator_claims_total", alone): 1,
        ("llproxy_operator_finished_total", support): 1,
        ("llproxy_operator_rejects_total", support): 1,
        ("llproxy_operator_handoffs_total", support): 1,
        ("llproxy_operator_fallbacks_total", quick): 1,
        ("llproxy_operator_timeouts_total", (*quick, ("waited", "queue_timeout"))): 1,
        ("llproxy_operator_timeouts_total", (*alone, ("waited", "idle_timeout"))): 1,
        ("llproxy_operator_wait_until_claimed_seconds_count", support): 2,
        ("llproxy_operator_wait_until_claimed_seconds_count", alone): 1,
        ("llproxy_operator_wait_until_finished_seconds_count", support): 1,
    }
    operator_samples = {
        key: value
        for key, value in samples.items()
        if key[0].startswith("llproxy_operator")
        and not key[0].endswith(("_bucket", "_sum"))
        and not key[0].endswith("_created")
    }
    assert operator_samples == expected
    waiting.cancel()
    for operator in (alice, bob):
        await operator.close()


async def test_failed_sign_ins_are_limited_per_address(
    start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Ten wrong keys a minute from one address; then it is refused (429 before the
    upgrade, 4429 for a key sent in a message) whatever key it shows, while another
    address signs in."""
    state = tmp_path / "state"
    endpoints = [{"operator": "human", "tags": ["support"]}]
    with KeyStore(state) as store:
        alice = store.create("alice", operator=True)
    proxy = await start_proxy(endpoints, state_dir=str(state), trusted_proxies=["127.0.0.1/32"])
    url = f"{proxy.url}/operator/ws"

    def headers(key: str, address: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}", "X-Forwarded-For": address}

    async with aiohttp.ClientSession() as session:
        for _ in range(10):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url, headers=headers("llp-guess", "10.0.0.1"))
            assert refused.value.status == 401
        for key in ("llp-guess", alice):  # one too many; then even the right key
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url, headers=headers(key, "10.0.0.1"))
            assert refused.value.status == 429
            assert refused.value.headers is not None
            assert 0 < int(refused.value.headers["Retry-After"]) <= 60
        async with session.ws_connect(url, headers={"X-Forwarded-For": "10.0.0.1"}) as socket:
            await socket.send_json({"type": "auth", "token": alice})
            message = await socket.receive(timeout=10)
            assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 4429
            assert "failed operator sign-ins" in message.extra
        other = await session.ws_connect(url, headers=headers(alice, "10.0.0.2"))
        assert (await other.receive_json(timeout=10))["type"] == "hello"
        await other.close()


async def test_a_flooding_socket_is_read_more_slowly(desk: Desk) -> None:
    """Past its burst (200) a socket's messages are read at 100 a second: 400 take at
    least 2 s to be answered, and another operator's claim is answered meanwhile."""
    flooder = await desk.operator("bob")
    alice = await desk.operator()
    asking = asyncio.ensure_future(
        desk.client().chat.completions.create(model="human:support", messages=HELLO)
    )
    request = (await alice.expect("added"))["request"]["id"]
    junk = [
        orjson.dumps({"type": "claim", "request": "req_nothing", "id": f"f{i}"}).decode()
        for i in range(400)
    ]
    started = time.monotonic()
    for message in junk:
        await flooder.socket.send_str(message)
    await alice.ok("claim", request)

    def answered() -> int:
        return sum(1 for e in flooder.events if str(e.get("id", "")).startswith("f"))

    assert answered() < 400, "the claim waited for the whole flood"
    await alice.ok("finish", request, reason="stop")
    await asyncio.wait_for(asking, 10)
    async with asyncio.timeout(30):
        while answered() < 400:
            await asyncio.sleep(0.05)
    assert time.monotonic() - started >= 1.5  # (400 - 200) / 100 s, less some slack
    for operator in (alice, flooder):
        await operator.close()


async def test_a_message_over_1_mib_closes_the_socket(desk: Desk) -> None:
    alice = await desk.operator()
    await alice.socket.send_str(" " * ((1 << 20) + 1))
    await asyncio.wait_for(alice._reader, 10)
    assert alice.socket.close_code == 1009  # message too big
    await alice.close()


async def test_the_socket_follows_the_origin_rules(desk: Desk) -> None:
    """A page of another origin cannot open the operators' socket (a key kept in a
    browser's password manager must not be usable by any site); llproxy's own page can."""
    url = f"{desk.proxy.url}/operator/ws"
    headers = {"Authorization": f"Bearer {desk.keys['alice']}"}
    async with aiohttp.ClientSession() as session:
        for origin in ("http://evil.example", "null"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url, headers={**headers, "Origin": origin})
            assert refused.value.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, headers={**headers, "Sec-Fetch-Site": "cross-site"})
        assert refused.value.status == 403
        socket = await session.ws_connect(url, headers={**headers, "Origin": desk.proxy.url})
        assert (await socket.receive_json(timeout=10))["type"] == "hello"
        await socket.close()


async def test_a_handoff_to_an_operator_model_queues_it_for_those_operators(desk: Desk) -> None:
    alice = await desk.operator()
    asking = asyncio.ensure_future(
        desk.client().chat.completions.create(model="human:support", messages=HELLO)
    )
    request = (await alice.expect("added"))["request"]["id"]
    await alice.ok("claim", request)
    await alice.ok("delta", request, text="Passing you on. ")
    # No mode: replace, refused once text reached the client.
    refused = await alice.command("handoff", request, model="human:quick")
    assert "mode continue" in refused["reason"]
    await alice.ok("handoff", request, model="human:quick", mode="continue")
    queued = (await alice.expect("added"))["request"]
    assert queued["model"] == "human:quick"
    assert queued["messages"][-1] == {"role": "assistant", "content": "Passing you on. "}
    await alice.ok("claim", queued["id"])
    await alice.ok("delta", queued["id"], text="Quick desk here.")
    await alice.ok("finish", queued["id"])
    answer = await asyncio.wait_for(asking, 10)
    assert answer.choices[0].message.content == "Passing you on. Quick desk here."
    assert answer.model == "human:support"
    await alice.close()


async def test_a_key_revoked_on_another_host_closes_its_socket_here(
    start_proxy: ProxyFactory, tmp_path: Path, redis_url: str
) -> None:
    """Two hosts share Redis, not their key databases: a key revoked on one closes its
    open socket on the other once that host reads the revocations again."""
    here, there = tmp_path / "here", tmp_path / "there"
    with KeyStore(there) as store:
        alice = store.create("alice", operator=True)
    here.mkdir()
    for database in there.glob(f"{DATABASE}*"):  # the same key, in a database of its own
        shutil.copy(database, here / database.name)
    endpoints = [{"operator": "human", "tags": ["support"]}]
    proxy = await start_proxy(endpoints, state_dir=str(here), redis_url=redis_url)
    config = tmp_path / "there.json"
    config.write_text(json.dumps({"endpoints": endpoints, "redis_url": redis_url}))
    async with aiohttp.ClientSession() as session:
        socket = await session.ws_connect(
            f"{proxy.url}/operator/ws", headers={"Authorization": f"Bearer {alice}"}
        )
        assert (await socket.receive_json(timeout=10))["type"] == "hello"
        revoked = await asyncio.to_thread(
            run_cli, "keys", "revoke", "alice", "--config", str(config), state=there
        )
        assert revoked.returncode == 0, revoked.stderr
        assert await _close_of(socket) == (4401, "the operator key was revoked")


@pytest.mark.parametrize(
    ("path", "body", "first"),
    [
        ("/v1/chat/completions", {"messages": HELLO}, b'"role":"assistant"'),
        ("/v1/messages", {"messages": HELLO, "max_tokens": 50}, b"event: message_start"),
        ("/v1/responses", {"input": "hello"}, b"event: response.created"),
    ],
)
async def test_each_dialect_hears_at_once_that_its_request_waits(
    desk: Desk, path: str, body: dict[str, Any], first: bytes
) -> None:
    """What the README promises each dialect while an operator is awaited: its first
    event at once, before anyone claims the request."""
    headers = {"Authorization": f"Bearer {desk.keys['client']}", "anthropic-version": "2023-06-01"}
    request = {"model": "human:support", "stream": True, **body}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{desk.proxy.url}{path}", json=request, headers=headers) as response,
    ):
        assert response.status == 200
        seen = b""
        async with asyncio.timeout(10):  # nobody claims it: a bound on a hang
            while first not in seen:
                seen += await response.content.readany()
