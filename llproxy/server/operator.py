"""The operators' side of the server: the WebSocket an operator works through
(`/operator/ws`, the protocol in the README) and the operator web page, shipped in the
package (`/operator/`). Only an operator key opens either's socket; the desk behind it is
the same whichever worker the socket and the client's request landed in."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import itertools
import logging
import time

import orjson
from aiohttp import WSMsgType, web

from ..core.desk import PROTOCOL, Event
from ..core.errors import InvalidApiKey, RouteNotFound
from ..core.keys import ApiKey
from ..core.ratelimit import RateLimitExceeded
from ..core.sse import json_document
from ..gateway.credentials import presented_secret
from .state import STATE, ProxyState

log = logging.getLogger("llproxy.operator")

SOCKET_PATH = "/operator/ws"
# Seconds a socket opened without a key in its headers (a browser cannot set them) has to
# send {"type": "auth", "token": …} as its first message.
AUTH_SECONDS = 10.0
HEARTBEAT_SECONDS = 20.0
# How often an open socket's key is looked at again: a revocation reaches this process's
# keys within KEY_REFRESH_SECONDS, an expiry is seen here; either closes the socket.
KEY_CHECK_SECONDS = 0.5
MAX_MESSAGE_BYTES = 1 << 20
# Close codes (4000 to 4999 are the application's): no valid operator key (or no longer
# valid); too many failed sign-ins from the address; a retiring worker.
UNAUTHORIZED = 4401
TOO_MANY_SIGN_INS = 4429  # the address failed to sign in too often: wait
GOING_AWAY = 1001
_REFUSAL = "an operator key is needed"

_PAGE = importlib.resources.files("llproxy.server") / "operator_page"
_MEDIA = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
# The page loads only its own files and talks only to its own server.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_connections = itertools.count(1)
# A socket may send this many messages a second, in bursts of up to COMMAND_BURST; past
# that its messages are read more slowly (TCP holds the rest back), so one that floods
# cannot queue thousands of commands ahead of another operator's claim. A person typing
# fast sends some 20 deltas a second.
COMMANDS_PER_SECOND = 100.0
COMMAND_BURST = 200.0


class Pace:
    """A token bucket: how long to wait before the next message is read."""

    def __init__(self, rate: float = COMMANDS_PER_SECOND, burst: float = COMMAND_BURST) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.last = burst, time.monotonic()

    def take(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


async def operator_socket(request: web.Request) -> web.WebSocketResponse:
    state = request.app[STATE]
    guard, address = state.gateway.sign_ins, state.gateway.address(request)
    secret = presented_secret(request.headers)
    key: ApiKey | None = None
    if secret:
        guard.check(address)  # an address that failed too often: a 429, whatever the key
        key = state.gateway.operator(secret)
        if key is None:
            await guard.failed(address)
            raise InvalidApiKey(_REFUSAL)  # before the upgrade: a plain 401
    socket = web.WebSocketResponse(heartbeat=HEARTBEAT_SECONDS, max_msg_size=MAX_MESSAGE_BYTES)
    await socket.prepare(request)
    if not secret:
        # A browser cannot read a refused upgrade's status: it is told in the close.
        try:
            guard.check(address)
            key = await _key_from_first_message(state, socket)
            if key is None:
                await guard.failed(address)
        except RateLimitExceeded as exceeded:
            await socket.close(code=TOO_MANY_SIGN_INS, message=exceeded.message.encode())
            return socket
    if key is None:
        await socket.close(code=UNAUTHORIZED, message=_REFUSAL.encode())
        return socket
    await _serve(state, socket, key)
    return socket


async def _key_from_first_message(
    state: ProxyState, socket: web.WebSocketResponse
) -> ApiKey | None:
    try:
        message = await socket.receive(timeout=AUTH_SECONDS)
    except TimeoutError:
        return None
    if message.type != WSMsgType.TEXT:
        return None
    document = json_document(message.data.encode())
    if not isinstance(document, dict) or document.get("type") != "auth":
        return None
    token = document.get("token")
    return state.gateway.operator(token) if isinstance(token, str) else None


async def _serve(state: ProxyState, socket: web.WebSocketResponse, key: ApiKey) -> None:
    conn = f"w{state.worker_id}-{next(_connections)}"
    outbox: asyncio.Queue[Event] = asyncio.Queue()
    desk = state.services.desk
    hello = {"type": "hello", "protocol": PROTOCOL, "operator": key.name}
    await _send(socket, {**hello, "worker": state.worker_id})
    log.info("operator %s connected (%s)", key.name, conn)
    state.operator_sockets.add(socket)
    desk.attach(conn, key.name, key.models, outbox.put_nowait)
    sender = asyncio.create_task(_send_all(socket, outbox), name=f"llproxy-operator-{conn}")
    watcher = asyncio.create_task(_watch_key(state, socket, key), name=f"llproxy-key-{conn}")
    pace = Pace()
    try:
        async for message in socket:
            if (wait := pace.take()) > 0:
                await asyncio.sleep(wait)
            if message.type != WSMsgType.TEXT:
                await _send(socket, {"type": "error", "message": "messages are JSON text"})
                continue
            command = json_document(message.data.encode())
            if not isinstance(command, dict):
                await _send(socket, {"type": "error", "message": "a JSON object is needed"})
                continue
            desk.command(conn, command)
    finally:
        desk.detach(conn)
        for task in (sender, watcher):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        state.operator_sockets.discard(socket)
        log.info("operator %s left (%s)", key.name, conn)


async def _watch_key(state: ProxyState, socket: web.WebSocketResponse, key: ApiKey) -> None:
    """Close the socket once its key is revoked, expires or is deleted: the key opened
    it, and every claim it holds goes back to the queue."""
    while not socket.closed:
        await asyncio.sleep(KEY_CHECK_SECONDS)
        why = state.gateway.keys.lapsed(key)
        if why is not None:
            log.warning("operator %s: key %s, closing its socket", key.name, why)
            said = "expired" if why == "expired" else f"was {why}"
            await socket.close(code=UNAUTHORIZED, message=f"the operator key {said}".encode())
            return


async def _send_all(socket: web.WebSocketResponse, outbox: asyncio.Queue[Event]) -> None:
    while True:
        event = await outbox.get()
        if socket.closed:
            return
        await _send(socket, event)


async def _send(socket: web.WebSocketResponse, event: Event) -> None:
    with contextlib.suppress(ConnectionError):
        await socket.send_str(orjson.dumps(event).decode())


async def close_operator_sockets(state: ProxyState) -> None:
    """A retiring worker sends its operators elsewhere: they reconnect to another worker
    (their claims go back to the queue meanwhile; what they sent stays sent)."""
    for socket in list(state.operator_sockets):
        await socket.close(code=GOING_AWAY, message=b"this worker is retiring: reconnect")


async def operator_page(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("file") or "index.html"
    resource = _PAGE / name
    media = _MEDIA.get(name[name.rfind(".") :]) if "." in name else None
    if media is None or "/" in name or not resource.is_file():
        raise RouteNotFound(f"no {request.path}")
    return web.Response(
        body=resource.read_bytes(),
        content_type=media,
        charset="utf-8",
        headers={"Content-Security-Policy": _PAGE_POLICY},
    )


async def operator_root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/operator/")
