"""A client's tool schemas are hostile: the master's desk checks an operator's tool calls
against them without fetching, blocking or dying. A real `llproxy serve`, a real operator
WebSocket, a client of the openai SDK."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import openai

from llproxy.stores.sqlite import KeyStore

from .conftest import UpstreamFactory
from .operator_client import TestOperator

HELLO = [{"role": "user", "content": "hello"}]
# Typed by a person, and fatal to a backtracking engine running the pattern below: every
# split of the words into runs is tried before the comma fails the match.
SENTENCE = "Please book the small meeting room for the team on Thursday morning at ten, thanks"


def tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array"}
    for _ in range(levels - 1):
        schema = {"type": "array", "items": schema}
    return schema


async def test_hostile_tool_schemas_are_refused_and_the_master_goes_on(
    start_upstream: UpstreamFactory, start_llproxy: Any, tmp_path: Path
) -> None:
    upstream = await start_upstream()
    state = tmp_path / "state"
    with KeyStore(state) as store:
        key = store.create("alice", operator=True)
    config = tmp_path / "llproxy.json"
    endpoints = [upstream.endpoint(), {"operator": "human", "tags": ["support"]}]
    config.write_text(json.dumps({"endpoints": endpoints}))
    # A port that accepts connections and never answers, and one that refuses them.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    silent_port = silent.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    cases = {
        "unresolvable": (
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}},
            {"a": 1},
            "does not resolve inside the schema",
        ),
        "unreachable": (
            {"$ref": f"http://127.0.0.1:{closed_port}/schema.json"},
            {},
            "does not resolve inside the schema",
        ),
        "silent": (
            {"$ref": f"http://127.0.0.1:{silent_port}/schema.json"},
            {},
            "does not resolve inside the schema",
        ),
        "deep": (nested(120), {}, "nested too deep"),
        "backtracking": (
            {
                "type": "object",
                "properties": {"text": {"type": "string", "pattern": r"^([a-zA-Z0-9]+\s?)*$"}},
            },
            {"text": SENTENCE},
            "does not match",
        ),
    }
    process = await start_llproxy(
        "--config", str(config), "--workers", "1", "--state-dir", str(state)
    )
    operator = await TestOperator.connect(process.url, key)
    client = openai.AsyncOpenAI(base_url=f"{process.url}/v1", api_key="none", max_retries=0)
    try:
        tools: Any = [tool(name, schema) for name, (schema, _, _) in cases.items()]
        asking = asyncio.ensure_future(
            client.chat.completions.create(model="human:support", messages=HELLO, tools=tools)
        )
        added = (await operator.expect("added"))["request"]
        # What the worker found when the request arrived, for operators to see.
        assert list(added["tool_problems"]) == ["deep"]
        request = added["id"]
        await operator.ok("claim", request)
        for name, (_, arguments, why) in cases.items():
            refused = await operator.command("tool_call", request, name=name, arguments=arguments)
            assert refused["type"] == "refused" and why in refused["reason"], (name, refused)
        # Nothing was fetched from the port that never answers.
        silent.setblocking(False)
        try:
            silent.accept()[0].close()
            raise AssertionError("the master connected to a schema's $ref")
        except BlockingIOError:
            pass
        await operator.ok("delta", request, text="Done by hand.")
        await operator.ok("finish", request)
        answer = await asyncio.wait_for(asking, 10)
        assert answer.choices[0].message.content == "Done by hand."
        # The desk serves the next request, and the master its other jobs.
        asking = asyncio.ensure_future(
            client.chat.completions.create(model="human:support", messages=HELLO)
        )
        request = (await operator.expect("added"))["request"]["id"]
        await operator.ok("claim", request)
        await operator.ok("delta", request, text="Still here.")
        await operator.ok("finish", request)
        assert (await asyncio.wait_for(asking, 10)).choices[0].message.content == "Still here."
        async with aiohttp.ClientSession() as session, session.get(f"{process.url}/metrics") as r:
            assert r.status == 200
            assert "llproxy_requests_total" in await r.text()
    finally:
        await client.close()
        await operator.close()
        silent.close()
    process.signal(signal.SIGTERM)
    assert await process.wait_exit(timeout=30) == 0
