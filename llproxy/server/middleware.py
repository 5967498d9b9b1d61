"""The boundary every request passes once: the gateway's checks for its route, the
mapping of every error to the client's dialect, sending the answer, and then the
accounting of what happened (metrics, usage record, access log line)."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import HttpVersion10, web

from ..core.errors import (
    InternalError,
    MethodNotAllowed,
    ProxyError,
    RequestTooLarge,
    RouteNotFound,
)
from ..core.record import RequestRecord
from ..dialects import Dialect
from .handlers import Handler
from .respond import Delivery, answer_response, finish
from .state import DELIVERY, RECORD, ROUTES, SPEC, STATE, ProxyState, RouteSpec, select

log = logging.getLogger("llproxy.gateway")

# nginx's code for a request whose client left before the answer: logged, never sent.
CLIENT_CLOSED_REQUEST = 499


@web.middleware
async def boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every request once, in its client's dialect even when it fails, and account
    for it after the client has its bytes (the answer is sent here, not by aiohttp after
    the return)."""
    if request.version < HttpVersion10:
        return _unanswered(request)
    started = time.perf_counter()
    state = request.app[STATE]
    specs = request.app[ROUTES].get(request.match_info.route)
    spec = select(specs, request.headers) if specs else None
    dialect = (
        spec.dialect if spec is not None else state.paths.dialect(request.path, request.headers)
    )
    record = RequestRecord(dialect=dialect.name)
    request[RECORD] = record
    if spec is not None:
        request[SPEC] = spec
    status = 500
    state.active_requests += 1
    try:
        response = await _answer(request, handler, state, spec, dialect, record)
        status = response.status
        if state.accounting.capture is not None and isinstance(response, web.Response):
            # A whole answer (an error too) as the client gets it, for the wire capture.
            record.response_chunks = None
            if isinstance(response.body, bytes):
                record.response_body = response.body
        try:
            await finish(request, response, request[DELIVERY])
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
        # Unmatched requests count when they look like API calls (a 404 below /v1/).
        if spec.accounted if spec is not None else request.path.startswith("/v1/"):
            state.accounting.account(request, record, status, started)


def _unanswered(request: web.Request) -> web.StreamResponse:
    """HTTP/0.9 (`GET /`, no version): it has no status line and no headers, so an answer
    in its version would be a status and headers its client reads as the body, and one in
    HTTP/1.x is not what it asked for. The connection is closed unanswered."""
    log.debug("HTTP/0.9 request from %s: closed unanswered", request.remote)
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=400)


async def _answer(
    request: web.Request,
    handler: Handler,
    state: ProxyState,
    spec: RouteSpec | None,
    dialect: Dialect,
    record: RequestRecord,
) -> web.StreamResponse:
    """The handler's response after the gateway's checks, or the error it became."""
    headers = state.gateway.headers(request)
    every = state.config.timeouts.stream_keepalive
    request[DELIVERY] = Delivery(headers, state.draining, every)
    try:
        limit_headers = await state.gateway.admit(
            request,
            record,
            spec is not None and spec.route.needs_key,
            spec.route.key_param if spec is not None else None,
        )
        if limit_headers:
            request[DELIVERY] = Delivery({**headers, **limit_headers}, state.draining, every)
        return await handler(request)
    except ProxyError as error:
        return answer_response(dialect.error(error))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return answer_response(dialect.error(_routing_error(request, state, exc)))
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return answer_response(dialect.error(InternalError()))


def _routing_error(request: web.Request, state: ProxyState, exc: web.HTTPException) -> ProxyError:
    """What aiohttp's own refusals (no such route, wrong method, body too large) are."""
    if exc.status == 413:
        limit = state.config.max_request_bytes
        return RequestTooLarge(f"request body is larger than the limit of {limit} bytes")
    message = f"{exc.reason}: {request.method} {request.path}"
    if exc.status == 405:
        return MethodNotAllowed(message, exc.headers.get("Allow", ""))
    if exc.status == 404:
        return RouteNotFound(message)
    return Refused(exc.status, message)


class Refused(ProxyError):
    """Any other refusal aiohttp made before a handler ran."""

    type = "invalid_request_error"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
