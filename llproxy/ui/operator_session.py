"""The operator's WebSocket to llproxy (`/operator/ws`, protocol 1 in the README): one
connection at a time, each command numbered so its ack or refusal can be matched, the
key sent only in the Authorization header (never in the URL, never shown)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

Event = dict[str, Any]

SOCKET_PATH = "/operator/ws"
UNAUTHORIZED = 4401  # the server's close code for a key that is no operator key
TOO_MANY_SIGN_INS = 429  # the server's status for an address that failed too often
CONNECT_SECONDS = 10.0
# Pings find a server that vanished without closing (a dead network) within this long.
HEARTBEAT_SECONDS = 20.0


_ENDS = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


class NotAnOperator(Exception):
    """The server refused the key: a 401 before the upgrade, or a close with 4401 (its
    reason, such as a key revoked while the socket was open, is the message)."""


class OperatorSession:
    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/") + SOCKET_PATH
        self._headers = {"Authorization": f"Bearer {token}"}
        self._ids = itertools.count(1)
        self._http: aiohttp.ClientSession | None = None
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        # Deltas carry offsets counted in the order they are sent; aiohttp may compress a
        # long frame in a thread and let a later short one overtake it, so sends queue here.
        self._sending = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._socket is not None and not self._socket.closed

    @property
    def close_code(self) -> int | None:
        return self._socket.close_code if self._socket is not None else None

    async def connect(self) -> None:
        """Opens the socket; NotAnOperator, or aiohttp.ClientError, OSError or TimeoutError
        when the server cannot be reached."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(CONNECT_SECONDS):
                self._socket = await self._http.ws_connect(
                    self.url,
                    headers=self._headers,
                    heartbeat=HEARTBEAT_SECONDS,
                    # A snapshot carries every queued conversation, pictures included: the
                    # server's own request limit bounds it, not this client.
                    max_msg_size=0,
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise NotAnOperator from None
            if exc.status == TOO_MANY_SIGN_INS:
                raise NotAnOperator("too many failed sign-ins from this address: wait") from None
            raise

    async def events(self) -> AsyncIterator[Event]:
        """What the server sends, until the socket closes."""
        socket = self._socket
        assert socket is not None
        reason = ""
        while True:
            message = await socket.receive()
            if message.type == aiohttp.WSMsgType.CLOSE:
                reason = str(message.extra or "")
            if message.type in _ENDS:
                break
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                event = orjson.loads(message.data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                yield event
        if socket.close_code == UNAUTHORIZED:
            raise NotAnOperator(reason)

    async def send(self, command: Event) -> int | None:
        """Sends a command with a fresh id, returned; None when there is no connection."""
        socket = self._socket
        if socket is None or socket.closed:
            return None
        command_id = next(self._ids)
        try:
            async with self._sending:
                await socket.send_str(orjson.dumps({**command, "id": command_id}).decode())
        except ConnectionError:
            return None
        return command_id

    async def close(self) -> None:
        if self._socket is not None:
            await self._socket.close()
        if self._http is not None:
            await self._http.close()
