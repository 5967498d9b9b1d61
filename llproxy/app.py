"""The aiohttp application: routes, the one error/access-log boundary, and owned lifetimes.

The app reads the current Registry snapshot from ProxyState; who replaces it (a discovery
loop in this process, or a supervisor feeding workers) is decided by whoever builds the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from .admin import AdminApi
from .config import Config
from .discovery import DiscoveryLoop, ScanResult
from .errors import (
    InvalidApiKey,
    InvalidRequest,
    ModelNotAllowed,
    ModelNotFound,
    ProxyError,
    RequestTimeout,
    RequestTooLarge,
    ServiceUnavailable,
    error_body,
)
from .hardening import add_response_headers, check_host, preflight
from .keys import ApiKey, KeyRing, state_dir
from .metrics import CONTENT_TYPE, DiscoveryTelemetry, Telemetry, render
from .proxy import Exchange, UpstreamClient, make_upstream_session
from .ratelimit import (
    HitFunction,
    RateLimitExceeded,
    client_address,
    memory_counter,
    parse_networks,
    redis_counter,
)
from .registry import Registry
from .usage import FLUSH_SECONDS, UsageRecord, UsageWriter
from .validation import validate

access_log = logging.getLogger("llproxy.access")
log = logging.getLogger("llproxy.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ProxyState:
    """Per-process serving state; `registry` is swapped whole, never mutated."""

    def __init__(self, config: Config, worker_id: int = 0) -> None:
        self.config = config
        self.worker_id = worker_id
        self.workers = 1
        self.registry = Registry()
        self.models_body = _listing_body(self.registry)
        self.upstreams: UpstreamClient | None = None
        self.discovery: DiscoveryLoop | None = None
        self.telemetry = Telemetry()
        # Where /metrics comes from: this process alone, or (in a worker) the supervisor,
        # which merges every worker's numbers.
        self.discovery_telemetry: DiscoveryTelemetry | None = None
        self.metrics_source: Callable[[], Awaitable[bytes]] | None = None
        self.keys = KeyRing()
        # Who counts requests against rate limits; None until the app starts.
        self.rate_hit: HitFunction | None = None
        self.trusted_proxies = parse_networks("trusted_proxies", config.trusted_proxies)
        # Usage records wait here for whoever writes them (this process, or the supervisor).
        self.pending_usage: list[UsageRecord] = []

    def take_usage(self) -> list[UsageRecord]:
        records, self.pending_usage = self.pending_usage, []
        return records

    def take_scan(self, result: ScanResult) -> None:
        if self.discovery_telemetry is not None:
            self.discovery_telemetry.record(result)
        self.set_registry(result.registry)

    def set_registry(self, registry: Registry) -> None:
        # Serialise once per snapshot rather than per GET /v1/models.
        self.models_body = _listing_body(registry)
        self.registry = registry


STATE = web.AppKey("llproxy_state", ProxyState)
EXCHANGE = web.RequestKey("llproxy_exchange", Exchange)


def _listing_body(registry: Registry) -> bytes:
    return orjson.dumps({"object": "list", "data": registry.listing()})


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@web.middleware
async def boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every error to an OpenAI-shaped body and write the access log line, once."""
    started = time.perf_counter()
    exchange = Exchange()
    request[EXCHANGE] = exchange
    status = 500
    try:
        state = request.app[STATE]
        check_host(state.config, request)
        if request.path.startswith("/v1/") and request.method != "OPTIONS":
            if state.keys.enabled:
                exchange.key = _authenticate(state.keys, request)
            await _check_rate_limit(state, request, exchange)
        response = await handler(request)
        status = response.status
        if exchange.request_body is not None and isinstance(response, web.Response):
            exchange.response_body = response.body if isinstance(response.body, bytes) else None
        return response
    except ProxyError as exc:
        status = exc.status
        response = _json(exc.body(), exc.status)
        if isinstance(exc, RateLimitExceeded):
            response.headers["Retry-After"] = str(max(1, math.ceil(exc.verdict.reset_after)))
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status = exc.status
        if exc.status == 413:
            limit = request.app[STATE].config.max_request_bytes
            message = f"request body is larger than the limit of {limit} bytes"
        else:
            message = f"{exc.reason}: {request.method} {request.path}"
        code = _HTTP_ERROR_CODES.get(exc.status, exc.status)
        body = error_body(message, "invalid_request_error", None, code)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.Response(
            status=exc.status, body=body, content_type="application/json", headers=headers
        )
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _json(error_body("internal error in llproxy", "server_error", None, None), 500)
    finally:
        if request.path.startswith("/v1/"):
            _record(request, exchange, status, started)


def _authenticate(keys: KeyRing, request: web.Request) -> ApiKey:
    authorization = request.headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    secret = token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")
    key = keys.authenticate(secret) if secret else None
    if key is None:
        raise InvalidApiKey(
            "Incorrect API key provided"
            if secret
            else "An API key is required: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
        )
    return key


async def _check_rate_limit(state: ProxyState, request: web.Request, exchange: Exchange) -> None:
    key = exchange.key
    limit = key.rate_limit if key is not None and key.rate_limit else state.config.rate_limit
    if limit is None or state.rate_hit is None:
        return
    client = f"key:{key.name}" if key else f"ip:{client_address(request, state.trusted_proxies)}"
    try:
        verdict = await state.rate_hit(limit, client)
    except ServiceUnavailable:
        raise
    except Exception as exc:  # Redis down or similar: refuse rather than count nothing
        log.error("rate limiter failed: %s", exc)
        raise ServiceUnavailable("the rate limiter is unavailable") from None
    exchange.verdict = verdict
    if not verdict.allowed:
        raise RateLimitExceeded(verdict, limit)


def _check_model_allowed(key: ApiKey | None, name: str) -> None:
    if key is not None and not key.allows(name):
        raise ModelNotAllowed(f"this API key may not use the model '{name}'", param="model")


def _record(request: web.Request, exchange: Exchange, status: int, started: float) -> None:
    """Account one API request: metrics, the worker's stats, and the access log line."""
    now = time.perf_counter()
    state = request.app[STATE]
    # Only registry names become label values: a client must not mint time series.
    label = exchange.model if exchange.resolved and exchange.model else "-"
    telemetry = state.telemetry
    telemetry.count_request(label, status)
    if exchange.resolved:
        telemetry.observe(telemetry.duration, label, now - started)
        if exchange.first_byte_at is not None:
            telemetry.observe(
                telemetry.time_to_first_token, label, exchange.first_byte_at - started
            )
        if exchange.prompt_tokens is not None:
            telemetry.add_tokens(telemetry.prompt_tokens, label, exchange.prompt_tokens)
        if exchange.completion_tokens is not None:
            telemetry.add_tokens(telemetry.generation_tokens, label, exchange.completion_tokens)
        client = (
            exchange.key.name
            if exchange.key is not None
            else client_address(request, state.trusted_proxies)
        )
        state.pending_usage.append(
            UsageRecord(
                time.time(),
                client,
                label,
                exchange.upstream,
                status,
                exchange.prompt_tokens,
                exchange.completion_tokens,
                round((now - started) * 1000, 3),
            )
        )
    if exchange.upstream_error is not None:
        key = (exchange.upstream or "-", exchange.upstream_error)
        telemetry.upstream_errors[key] = telemetry.upstream_errors.get(key, 0) + 1
    if not access_log.isEnabledFor(logging.INFO):
        return
    if access_log.isEnabledFor(logging.DEBUG):
        _log_bodies(request, exchange)
    ttfb = None if exchange.first_byte_at is None else (exchange.first_byte_at - started) * 1000
    access_log.info(
        "%s %s %s",
        request.method,
        request.path,
        status,
        extra={
            "event": "request",
            "worker": state.worker_id,
            "client": request.remote,
            "key": None
            if exchange.key is None
            else f"{exchange.key.name}({exchange.key.fingerprint})",
            "method": request.method,
            "path": request.path,
            "model": exchange.model,
            "upstream": exchange.upstream,
            "status": status,
            "ttfb_ms": None if ttfb is None else round(ttfb, 1),
            "prompt_tokens": exchange.prompt_tokens,
            "completion_tokens": exchange.completion_tokens,
            "duration_ms": round((now - started) * 1000, 1),
        },
    )


BODY_LOG_LIMIT = 2000
_SECRET_HEADERS = {"authorization", "x-api-key", "apikey", "api-key", "proxy-authorization"}
_SECRET_FIELDS = re.compile(
    rb'("(?:api_?key|authorization|x-api-key|password|secret)"\s*:\s*)"(?:[^"\\]|\\.)*"',
    re.IGNORECASE,
)


def redact(body: bytes) -> str:
    """A body for the debug log: secret-looking JSON fields masked, then truncated."""
    masked = _SECRET_FIELDS.sub(rb'\1"***"', body)
    text = masked[:BODY_LOG_LIMIT].decode("utf-8", "replace")
    return text + (f"… ({len(body)} bytes)" if len(masked) > BODY_LOG_LIMIT else "")


def _log_bodies(request: web.Request, exchange: Exchange) -> None:
    headers = {
        name: "***" if name.lower() in _SECRET_HEADERS else value
        for name, value in request.headers.items()
    }
    access_log.debug(
        "request %s %s headers %s body %s",
        request.method,
        request.path,
        headers,
        redact(exchange.request_body or b""),
        extra={"event": "request_body"},
    )
    if exchange.response_body is not None:
        access_log.debug(
            "response body %s", redact(exchange.response_body), extra={"event": "response_body"}
        )


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return _json(
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
        body = render(state.telemetry, state.discovery_telemetry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    key = request[EXCHANGE].key
    if key is None or not key.models:
        return _json(state.models_body)
    allowed = [
        entry
        for name, entry in zip(state.registry.models, state.registry.listing(), strict=True)
        if key.allows(name)
    ]
    return _json(orjson.dumps({"object": "list", "data": allowed}))


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    _check_model_allowed(request[EXCHANGE].key, name)
    model = request.app[STATE].registry.get(name)
    if model is None:
        raise ModelNotFound(f"The model '{name}' does not exist", param="model")
    return _json(orjson.dumps(model.entry))


async def proxy_post(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    limit = state.config.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(f"request body is larger than the limit of {limit} bytes")
    raw = await _read_body(request, state.config)
    exchange = request[EXCHANGE]
    if access_log.isEnabledFor(logging.DEBUG):
        exchange.request_body = raw
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    path = request.match_info["path"]
    validate(path, body)

    name = body.get("model") or state.config.default_model
    if name is None:
        raise InvalidRequest("you must provide a model parameter", param="model")
    exchange.model = name
    _check_model_allowed(exchange.key, name)
    model = state.registry.get(name)
    if model is None:
        raise ModelNotFound(
            f"The model '{name}' does not exist; GET /v1/models lists the available models",
            param="model",
        )
    exchange.resolved = True
    if body.get("stream") is True and path in _USAGE_PATHS:
        body = _with_usage_chunk(body, exchange)
    assert state.upstreams is not None
    in_flight = state.telemetry.in_flight
    in_flight[name] = in_flight.get(name, 0) + 1
    try:
        return await state.upstreams.forward(request, model, path, body, exchange)
    finally:
        in_flight[name] -= 1


async def _read_body(request: web.Request, config: Config) -> bytes:
    if request.content.is_eof():  # the usual case: the body came with the headers
        return await request.read()
    try:
        async with asyncio.timeout(config.timeouts.client_body):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {config.timeouts.client_body:g} s"
        ) from None


async def _preflight(request: web.Request) -> web.Response:
    return await preflight(request, request.app[STATE].config)


async def _add_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    add_response_headers(request.app[STATE].config, request, response)
    exchange = request.get(EXCHANGE)
    if exchange is not None and exchange.verdict is not None:
        response.headers.update(exchange.verdict.headers())


async def _redis_limits(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    assert state.config.redis_url is not None
    counter = redis_counter(state.config.redis_url)
    state.rate_hit = counter.hit
    yield


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

    async def drain() -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            writer.add(state.take_usage())
            await writer.flush()

    task = asyncio.create_task(drain(), name="llproxy-usage-drain")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    writer.add(state.take_usage())
    await writer.close()


KEY_REFRESH_SECONDS = 2.0


async def _key_ring(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.keys = KeyRing(state.config.api_keys, state_dir(state.config.state_dir))

    async def refresh() -> None:
        while True:
            await asyncio.sleep(KEY_REFRESH_SECONDS)
            try:
                state.keys.refresh()
            except sqlite3.Error as exc:
                log.warning("cannot reload API keys: %s", exc)

    task = asyncio.create_task(refresh(), name="llproxy-keys")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    state.keys.close()


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    session = make_upstream_session(state.config.timeouts)
    state.upstreams = UpstreamClient(session, state.config.timeouts)
    yield
    await session.close()


async def _local_discovery(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.discovery = DiscoveryLoop(
        state.config, lambda result: state.set_registry(result.registry)
    )
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
        handler_args={"max_field_size": 16384},
    )
    app[STATE] = ProxyState(config, worker_id)
    app.cleanup_ctx.append(_key_ring)
    if config.redis_url is not None:
        app.cleanup_ctx.append(_redis_limits)
    elif discover:  # a single process counts for itself; workers ask the supervisor
        app[STATE].rate_hit = memory_counter().hit
    if discover:  # likewise it writes its own usage; workers send theirs to the supervisor
        app.cleanup_ctx.append(_usage_writer)
    app.cleanup_ctx.append(_upstream_session)
    if discover:
        app.cleanup_ctx.append(_local_discovery)
    app.on_response_prepare.append(_add_response_headers)
    if config.cors_origins:
        app.router.add_route("OPTIONS", "/v1/{path:.*}", _preflight)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{name}", get_model)
    app.router.add_post("/v1/{path:.+}", proxy_post)
    if config.admin_key is not None:
        AdminApi(config, lambda: app[STATE].keys.refresh()).add_routes(app)
    return app
