"""A test operator on llproxy's operator WebSocket: real aiohttp WebSocket client, every
event the server sends kept in order, commands sent and their answer awaited."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson

from llproxy.stores.sqlite import KeyStore

from .conftest import ProxyFactory, RunningProxy, RunningUpstream

Event = dict[str, Any]

# A tool with a schema to check arguments against (and to build the page's form from).
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "a city's name"},
                "days": {"type": "integer", "description": "how many days ahead"},
                "units": {"type": "string", "enum": ["metric", "imperial"]},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


class TestOperator:
    __test__ = False  # not a test class

    def __init__(self, session: aiohttp.ClientSession, socket: aiohttp.ClientWebSocketResponse):
        self.session = session
        self.socket = socket
        self.events: list[Event] = []
        self._seen = 0
        self._changed = asyncio.Event()
        self._ids = itertools.count(1)
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, base_url: str, token: str, in_header: bool = True) -> TestOperator:
        session = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {token}"} if in_header else {}
        try:
            socket = await session.ws_connect(f"{base_url}/operator/ws", headers=headers)
        except BaseException:
            await session.close()
            raise
        if not in_header:
            await socket.send_str(orjson.dumps({"type": "auth", "token": token}).decode())
        operator = cls(session, socket)
        try:
            await operator.expect("hello")
            await operator.expect("snapshot")
        except BaseException:  # a retiring worker may close it at once
            await operator.close()
            raise
        return operator

    async def _read(self) -> None:
        async for message in self.socket:
            if message.type == aiohttp.WSMsgType.TEXT:
                self.events.append(orjson.loads(message.data))
                self._changed.set()
        self._changed.set()

    async def expect(self, kind: str, timeout: float = 10, **fields: Any) -> Event:
        """The next event (after those already expected) of this type and these fields."""
        async with asyncio.timeout(timeout):
            while True:
                for i in range(self._seen, len(self.events)):
                    event = self.events[i]
                    if event.get("type") == kind and all(
                        event.get(k) == v for k, v in fields.items()
                    ):
                        self._seen = i + 1
                        return event
                if self.socket.closed and self._reader.done():
                    raise AssertionError(f"socket closed before a {kind} event: {self.events}")
                self._changed.clear()
                await self._changed.wait()

    async def command(self, kind: str, request: str | None = None, **fields: Any) -> Event:
        """Send a command; its ack or refusal."""
        command_id = next(self._ids)
        message = {"type": kind, "id": command_id, **fields}
        if request is not None:
            message["request"] = request
        await self.socket.send_str(orjson.dumps(message).decode())
        async with asyncio.timeout(10):
            while True:
                for event in self.events:
                    if event.get("id") == command_id and event.get("type") in ("ack", "refused"):
                        return event
                self._changed.clear()
                await self._changed.wait()

    async def ok(self, kind: str, request: str | None = None, **fields: Any) -> Event:
        answer = await self.command(kind, request, **fields)
        assert answer["type"] == "ack", answer
        return answer

    async def close(self) -> None:
        await self.socket.close()
        self._reader.cancel()
        await self.session.close()


@dataclass
class Desk:
    """A proxy with operator models, the keys of its operators and of one client."""

    proxy: RunningProxy
    keys: dict[str, str]
    state: Path
    upstream: RunningUpstream | None = None

    def client(self) -> openai.AsyncOpenAI:
        return self.proxy.client(api_key=self.keys["client"])

    async def operator(self, name: str = "alice", in_header: bool = True) -> TestOperator:
        return await TestOperator.connect(self.proxy.url, self.keys[name], in_header)


async def open_desk(
    start_proxy: ProxyFactory,
    state: Path,
    endpoints: list[dict[str, Any]],
    upstream: RunningUpstream | None = None,
    operators: dict[str, tuple[str, ...]] | None = None,
    **top: Any,
) -> Desk:
    """Operator keys (name → model globs; alice sees all by default) and a client key in
    `state`, then the proxy over `endpoints` (and any other top-level config keys)."""
    with KeyStore(state) as store:
        keys = {
            name: store.create(name, list(globs), operator=True)
            for name, globs in (operators if operators is not None else {"alice": ()}).items()
        }
        keys["client"] = store.create("client")
    proxy = await start_proxy(endpoints, state_dir=str(state), **top)
    return Desk(proxy, keys, state, upstream)
