"""The errors a client can be told, whatever dialect it speaks.

Each carries its HTTP status, OpenAI's error `type` and `code` (OpenAI is the internal
form; another dialect maps them to its own shape) and the headers it adds. Handlers raise
them; the server's one boundary turns them into the client's dialect.
"""

from __future__ import annotations

import orjson

# Statuses whose answer no retry of the same request can change. Such answers say so with
# `x-should-retry: false`, which the Anthropic and OpenAI SDKs (and Claude Code) obey
# before their own rules: without it Claude Code sent a wrong key 11 times over 3 minutes.
FINAL_STATUSES = frozenset({400, 401, 403, 404, 405, 413, 414, 415, 417, 422, 431})
NO_RETRY = {"x-should-retry": "false"}


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        """Headers the answer carries besides the body (Retry-After, …)."""
        return {}


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class InvalidApiKey(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotAllowed(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class RouteNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(
            f"The model '{name}' does not exist; GET /v1/models lists the available models",
            param="model",
        )
        self.name = name


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, allowed: str) -> None:
        super().__init__(message)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allowed}


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class RequestTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(ProxyError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class ExpectationFailed(ProxyError):
    status = 417
    type = "invalid_request_error"
    code = "expectation_failed"


class LoopDetected(ProxyError):
    status = 508
    type = "invalid_request_error"
    code = "loop_detected"


class UpstreamUnreachable(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class UpstreamMalformed(ProxyError):
    """The upstream answered 2xx with something that is not a well-formed answer (cut,
    not JSON, NaN, or members of the wrong type)."""

    status = 502
    type = "upstream_error"
    code = "upstream_malformed"


class UpstreamFailed(ProxyError):
    """The upstream answered an error after the client's stream had started: it becomes
    the stream's error event, with the upstream's status and message."""

    type = "upstream_error"

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(_said(body) or f"upstream status {status}", code=str(status))
        self.status = status


def _said(body: bytes) -> str:
    """What an error body says: its `error.message` (or `message`), else its text."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:1000].decode("utf-8", "replace").strip()
    error = document.get("error") if isinstance(document, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if message is None and isinstance(document, dict):
        message = document.get("message") or error
    return message if isinstance(message, str) else body[:1000].decode("utf-8", "replace")


class ReplicaUnavailable(UpstreamUnreachable):
    """This replica could not be reached and was sent nothing: another may be tried."""


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class ServiceUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class InternalError(ProxyError):
    """A fault of llproxy's own; its detail goes to the log, not to the client."""

    def __init__(self) -> None:
        super().__init__("internal error in llproxy")


class OperatorFailed(ProxyError):
    """A request a human operator did not answer. The client must not send it again by
    itself: that would queue the same prompt for a person twice."""

    def headers(self) -> dict[str, str]:
        return {"x-should-retry": "false"}


class OperatorRejected(OperatorFailed):
    status = 400
    type = "invalid_request_error"
    code = "rejected_by_operator"


class OperatorTimeout(OperatorFailed):
    status = 504
    type = "timeout_error"
    code = "operator_timeout"


class OperatorInterrupted(OperatorFailed):
    """The serving process holding the client's request retired (a reload or a stop)
    before an operator finished it, and its graceful timeout ran out."""

    status = 503
    type = "server_error"
    code = "operator_interrupted"


class OperatorKeyRefused(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "operator_key"
