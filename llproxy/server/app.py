"""The aiohttp application: routes, handlers, and the lifetimes of what the app owns.

The app reads the current Registry snapshot from ProxyState; who replaces it (a discovery
loop in this process, or a supervisor feeding workers) is decided by whoever builds the app.
Every request first passes the gateway's boundary middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import HttpVersion11, web
from redis.exceptions import RedisError

from ..backends.openai_http.client import Exchange, UpstreamClient
from ..backends.openai_http.discovery import DiscoveryLoop
from ..backends.openai_http.transport import request_path, response_bounds
from ..config import Config
from ..core.encoding import BodyEncodingError, BodyTooLarge, UnsupportedEncoding, decode_body
from ..core.errors import (
    ExpectationFailed,
    InvalidRequest,
    ModelNotFound,
    RequestTimeout,
    RequestTooLarge,
    RouteNotFound,
    UnsupportedMediaType,
    json_response,
)
from ..core.keys import REVOKED_SET, KeyRing
from ..core.payload import FormPayload, JsonPayload, Payload
from ..core.ratelimit import RedisCounter, memory_counter, redis_client
from ..core.usage import UsageWriter
from ..gateway.hardening import preflight
from ..stores.sqlite import state_dir
from ..telemetry.metrics import CONTENT_TYPE, DiscoveryTelemetry, render
from .admin import AdminApi
from .middleware import boundary, check_model_allowed
from .state import EXCHANGE, STATE, ProxyState, listing_body

access_log = logging.getLogger("llproxy.access")
log = logging.getLogger("llproxy.app")


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response(
        orjson.dumps(
            {
                "status": "ok",
                "models": len(state.registry.models),
                "workers": state.workers,
                "worker": state.worker_id,
                "pid": os.getpid(),
            }
        )
    )


async def prometheus(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.metrics_source is not None:
        body = await state.metrics_source()
    else:
        body = render(state.telemetry, state.discovery_telemetry, state.usage_telemetry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    key = request[EXCHANGE].key
    if key is None or not key.models:
        return json_response(state.models_body)
    allowed = [
        entry
        for name, entry in zip(state.registry.models, state.registry.listing(), strict=True)
        if key.allows(name)
    ]
    return json_response(listing_body(allowed))


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    check_model_allowed(request[EXCHANGE].key, name)
    model = request.app[STATE].registry.get(name)
    if model is None:
        raise ModelNotFound(f"The model '{name}' does not exist", param="model")
    return json_response(orjson.dumps(model.entry))


async def proxy_post(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    path = request.match_info["path"]
    # Only what the gateway means to forward goes upstream, with the endpoint's key: not
    # management paths (/v1/files, /v1/organization/...) nor anything that is no path.
    if path not in state.forward_paths:
        raise RouteNotFound(f"Not Found: POST /v1/{path} is not an inference route")
    raw = await read_body(request, state.config)
    exchange = request[EXCHANGE]
    if access_log.isEnabledFor(logging.DEBUG):
        exchange.request_body = raw
    payload: Payload
    if request.content_type == "multipart/form-data":
        payload = FormPayload.parse(raw, request.headers.get("Content-Type", ""))
    else:
        payload = JsonPayload.parse(raw, path)
    target = request_path(path)

    name = payload.model or state.config.default_model
    if name is None:
        raise InvalidRequest("you must provide a model parameter", param="model")
    exchange.model = name
    check_model_allowed(exchange.key, name)
    model = state.registry.get(name)
    if model is None:
        raise ModelNotFound(
            f"The model '{name}' does not exist; GET /v1/models lists the available models",
            param="model",
        )
    exchange.resolved = True
    if isinstance(payload, JsonPayload) and payload.stream and path in _USAGE_PATHS:
        payload = JsonPayload(_with_usage_chunk(payload.body, exchange))
    assert state.upstreams is not None
    in_flight = state.telemetry.in_flight
    in_flight[name] = in_flight.get(name, 0) + 1
    try:
        return await state.upstreams.forward(request, model, target, payload, exchange)
    finally:
        in_flight[name] -= 1


async def read_body(request: web.Request, config: Config) -> bytes:
    """The request's body, decoded, within max_request_bytes and timeouts.client_body.

    `Expect: 100-continue` is answered only here, once the gateway let the request in and
    its announced size fits: a refused client never sends its body.
    """
    limit = config.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(f"request body is larger than the limit of {limit} bytes")
    expect = request.headers.get("Expect")
    if expect is not None:
        if expect.strip().lower() != "100-continue":
            raise ExpectationFailed(f"unsupported Expect: {expect[:100]!r}")
        if request.version >= HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the answer proper has not started
    if request.content.is_eof():  # the usual case: the body came with the headers
        raw = await request.read()
    else:
        try:
            async with asyncio.timeout(config.timeouts.client_body):
                raw = await request.read()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {config.timeouts.client_body:g} s"
            ) from None
    encoding = request.headers.get("Content-Encoding")
    if encoding is None:
        return raw
    try:
        return decode_body(raw, encoding, limit, config.max_compression_ratio)
    except UnsupportedEncoding as exc:
        raise UnsupportedMediaType(f"{exc}; send gzip, deflate or identity") from None
    except BodyTooLarge as exc:
        raise RequestTooLarge(f"decoded request {exc} (the limit is {limit})") from None
    except BodyEncodingError as exc:
        raise InvalidRequest(f"request {exc}") from None


async def _continue_later(request: web.Request) -> None:
    """aiohttp would send `100 Continue` before any check; read_body sends it instead."""


async def _preflight(request: web.Request) -> web.Response:
    return await preflight(request, request.app[STATE].config)


async def _redis_limits(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    assert state.config.redis_url is not None
    counter = RedisCounter(state.config.redis_url)
    state.rate_hit = counter.hit
    yield
    await counter.close()


_USAGE_PATHS = ("chat/completions", "completions")


def _with_usage_chunk(body: dict[str, Any], exchange: Exchange) -> dict[str, Any]:
    """Ask the upstream for the usage chunk; if the client did not, it is hidden again."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body
    exchange.hide_usage_chunk = True
    merged = (
        {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
    )
    return {**body, "stream_options": merged}


async def _usage_writer(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    writer = UsageWriter(state_dir(state.config.state_dir))
    state.usage_telemetry = writer.telemetry
    writer.start(state.take_usage)
    yield
    writer.add(state.take_usage())
    await writer.close()


KEY_REFRESH_SECONDS = 2.0


async def _key_ring(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.keys = KeyRing(state.config.api_keys, state_dir(state.config.state_dir))
    shared = redis_client(state.config.redis_url) if state.config.redis_url else None

    async def refresh() -> None:
        while True:
            try:
                state.keys.refresh()
                if shared is not None:
                    revoked = await shared.smembers(REVOKED_SET)
                    state.keys.revoked_elsewhere = frozenset(map(str, revoked))
            except (sqlite3.Error, RedisError) as exc:
                log.warning("cannot reload API keys: %s", exc)
            await asyncio.sleep(KEY_REFRESH_SECONDS)

    task = asyncio.create_task(refresh(), name="llproxy-keys")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if shared is not None:
        await shared.aclose(close_connection_pool=True)
    state.keys.close()


async def _upstream_client(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.upstreams = UpstreamClient(state.config.timeouts, response_bounds(state.config))
    yield
    await state.upstreams.close()


async def _local_discovery(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.discovery_telemetry = DiscoveryTelemetry()
    state.discovery = DiscoveryLoop(state.config, state.take_scan)
    await state.discovery.start()
    # Scan once before serving, so the first request already sees every model.
    await state.discovery.scan_now()
    yield
    await state.discovery.stop()


def create_app(config: Config, *, discover: bool = True, worker_id: int = 0) -> web.Application:
    """The llproxy app. With discover=False the caller feeds ProxyState.set_registry."""
    app = web.Application(
        middlewares=[boundary],
        client_max_size=config.max_request_bytes,
        # Compressed request bodies are decoded by read_body, within their bound.
        handler_args={"max_field_size": 16384, "auto_decompress": False},
    )
    app[STATE] = ProxyState(config, worker_id)
    app.cleanup_ctx.append(_key_ring)
    if config.redis_url is not None:
        app.cleanup_ctx.append(_redis_limits)
    elif discover:  # a single process counts for itself; workers ask the supervisor
        app[STATE].rate_hit = memory_counter().hit
    if discover:  # likewise it writes its own usage; workers send theirs to the supervisor
        app.cleanup_ctx.append(_usage_writer)
    app.cleanup_ctx.append(_upstream_client)
    if discover:
        app.cleanup_ctx.append(_local_discovery)
    if config.cors_origins:
        app.router.add_route("OPTIONS", "/v1/{path:.*}", _preflight)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{name}", get_model)
    app.router.add_post("/v1/{path:.+}", proxy_post, expect_handler=_continue_later)
    if config.admin_key is not None:
        AdminApi(config, lambda: app[STATE].keys.refresh()).add_routes(app)
    return app
