"""The HTTP server a worker runs: aiohttp's, with its own answers to malformed requests.

aiohttp answers a request its parser rejects (a bad request line, an over-long URL, an
unknown method, a tab in the path) itself, before any middleware: a plain-text body that
names aiohttp's version, and a traceback in the log with the client's raw bytes, keys
included. Here those answers are OpenAI-shaped JSON with the security headers, and the
log gets one line.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from ..core.errors import FINAL_STATUSES, NO_RETRY
from ..dialects.openai import error_body
from ..gateway.hardening import SECURITY_HEADERS
from .direct import DirectRoutes

log = logging.getLogger("llproxy.http")

_CODES = {413: "request_too_large", 414: "uri_too_long", 431: "headers_too_large"}


class _JsonErrors(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        reason = (getattr(exc, "message", None) or message or type(exc).__name__).strip()
        # A client's bytes, not llproxy's fault: one line at debug level, no traceback.
        log.debug("malformed request from %s: %s (%d)", request.remote, reason, status)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started; the connection is dropped")
        if status >= 500:
            text, kind, code = "internal error in llproxy", "server_error", None
        else:
            text = f"malformed HTTP request: {reason[:200]}"
            kind, code = "invalid_request_error", _CODES.get(status, "bad_request")
        response = web.Response(
            status=status,
            body=error_body(text, kind, None, code),
            content_type="application/json",
            headers={**SECURITY_HEADERS, **NO_RETRY}
            if status in FINAL_STATUSES
            else SECURITY_HEADERS,
        )
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrors(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """aiohttp's AppRunner whose connections answer parser errors as JSON, and whose
    server dispatches the model routes on fixed paths itself (`DirectRoutes`)."""

    async def _make_server(self) -> web.Server:
        server: Any = await super()._make_server()
        # Same server, same state: only how it makes a connection's handler differs.
        server.__class__ = _Server
        server.request_handler = DirectRoutes(self.app)
        return server  # type: ignore[no-any-return]
