"""The boundary every request passes once: host check, API key, rate limit, the mapping of
every error to an OpenAI-shaped body, and the accounting of what happened (metrics, usage
record, access log line).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..backends.openai_http.client import Exchange
from ..core.errors import (
    InvalidApiKey,
    ModelNotAllowed,
    ProxyError,
    ServiceUnavailable,
    error_body,
    json_response,
)
from ..core.keys import ApiKey, KeyRing
from ..core.ratelimit import RateLimitExceeded, client_address
from ..core.usage import UsageRecord
from ..gateway.hardening import check_host, check_origin, response_headers
from .state import EXCHANGE, STATE, ProxyState

access_log = logging.getLogger("llproxy.access")
log = logging.getLogger("llproxy.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# nginx's code for a request whose client left before the answer: logged, never sent.
CLIENT_CLOSED_REQUEST = 499


_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@web.middleware
async def boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every request once, OpenAI-shaped even when it fails, and account for it.

    The answer is sent here rather than by aiohttp after the return, so the accounting
    (metrics, usage record, access log line) runs after the client has its bytes.
    """
    started = time.perf_counter()
    state = request.app[STATE]
    api = request.path.startswith("/v1/")
    exchange = Exchange()
    request[EXCHANGE] = exchange
    status = 500
    state.active_requests += 1
    try:
        response = await _answer(request, handler, state, exchange, api)
        status = response.status
        try:
            if not response.prepared:  # else a stream, built with these headers
                response.headers.update(exchange.response_headers)
                if state.draining:
                    # This worker is retiring: the client must not send its next request
                    # here, so it is told to close, and closes cleanly.
                    response.force_close()
                await response.prepare(request)
            await response.write_eof()
        except ConnectionResetError:
            # aiohttp meets the same closed connection after the return and drops it.
            status = CLIENT_CLOSED_REQUEST
        return response
    except asyncio.CancelledError:
        # The client went away (or a graceful stop ran out of time): nobody gets an answer.
        status = CLIENT_CLOSED_REQUEST
        raise
    finally:
        state.active_requests -= 1
        if api:
            _record(request, state, exchange, status, started)


async def _answer(
    request: web.Request, handler: Handler, state: ProxyState, exchange: Exchange, api: bool
) -> web.StreamResponse:
    """The handler's response after the gateway's checks, or the error it became."""
    try:
        exchange.close_connection = state.draining
        exchange.response_headers = response_headers(state.config, request)
        check_host(request, state.accepted_hosts)
        check_origin(state.config, request)
        if api and request.method != "OPTIONS":
            if state.keys.enabled:
                exchange.key = _authenticate(state.keys, request)
            # Who the client is, for its rate limit and its usage records.
            exchange.client = (
                exchange.key.name
                if exchange.key is not None
                else client_address(request, state.trusted_proxies)
            )
            # Awaited only when a limit applies: most requests pass no limiter at all.
            if (limit := _rate_limit(state, exchange.key)) is not None:
                await _check_rate_limit(state, exchange, limit)
        response = await handler(request)
        if exchange.request_body is not None and isinstance(response, web.Response):
            exchange.response_body = response.body if isinstance(response.body, bytes) else None
        return response
    except ProxyError as exc:
        response = json_response(exc.body(), exc.status)
        if isinstance(exc, RateLimitExceeded):
            response.headers["Retry-After"] = str(max(1, math.ceil(exc.verdict.reset_after)))
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            message = (
                f"request body is larger than the limit of {state.config.max_request_bytes} bytes"
            )
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
        return json_response(
            error_body("internal error in llproxy", "server_error", None, None), 500
        )


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


def _rate_limit(state: ProxyState, key: ApiKey | None) -> str | None:
    """The limit that applies to this client; None when nothing counts its requests."""
    if state.rate_hit is None:
        return None
    return key.rate_limit if key is not None and key.rate_limit else state.config.rate_limit


async def _check_rate_limit(state: ProxyState, exchange: Exchange, limit: str) -> None:
    assert state.rate_hit is not None
    # Separate namespaces: a key named like an address must not share its counter.
    client = f"key:{exchange.client}" if exchange.key else f"ip:{exchange.client}"
    try:
        verdict = await state.rate_hit(limit, client)
    except ServiceUnavailable:
        raise
    except Exception as exc:  # Redis down or similar: refuse rather than count nothing
        log.error("rate limiter failed: %s", exc)
        raise ServiceUnavailable("the rate limiter is unavailable") from None
    exchange.response_headers = {**exchange.response_headers, **verdict.headers()}
    if not verdict.allowed:
        raise RateLimitExceeded(verdict, limit)


def check_model_allowed(key: ApiKey | None, name: str) -> None:
    if key is not None and not key.allows(name):
        raise ModelNotAllowed(f"this API key may not use the model '{name}'", param="model")


def _record(
    request: web.Request, state: ProxyState, exchange: Exchange, status: int, started: float
) -> None:
    """Account one API request: metrics, its usage record, and the access log line."""
    now = time.perf_counter()
    if exchange.read_usage is not None:
        exchange.take_usage(exchange.read_usage())
    # Only registry names become label values: a client must not mint time series.
    label = exchange.model if exchange.resolved and exchange.model else "-"
    telemetry = state.telemetry
    duration = now - started
    first_byte = None if exchange.first_byte_at is None else exchange.first_byte_at - started
    if exchange.resolved:
        telemetry.record_answer(
            label,
            status,
            duration,
            first_byte,
            exchange.prompt_tokens,
            exchange.completion_tokens,
        )
        state.pending_usage.append(
            UsageRecord(
                time.time(),
                exchange.client,
                label,
                exchange.upstream,
                status,
                exchange.prompt_tokens,
                exchange.completion_tokens,
                int(duration * 1_000_000) / 1000,  # ms, to the µs; cheaper than round()
            )
        )
    else:
        telemetry.count_request(label, status)
    if exchange.upstream_error is not None:
        key = (exchange.upstream or "-", exchange.upstream_error)
        telemetry.upstream_errors[key] = telemetry.upstream_errors.get(key, 0) + 1
    if not access_log.isEnabledFor(logging.INFO):
        return
    if access_log.isEnabledFor(logging.DEBUG):
        _log_bodies(request, exchange)
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
            "ttfb_ms": None if first_byte is None else round(first_byte * 1000, 1),
            "prompt_tokens": exchange.prompt_tokens,
            "completion_tokens": exchange.completion_tokens,
            "duration_ms": round(duration * 1000, 1),
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
