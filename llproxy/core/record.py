"""What happened to one request: the accounting (metrics, usage record, access log line)
is made from it once the client has its answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .keys import ApiKey
from .sse import cached_tokens, usage_numbers


@dataclass(slots=True)
class RequestRecord:
    dialect: str = "-"  # the client's dialect, for labels and the usage record
    key: ApiKey | None = None  # the client's key, when keys are in use
    client: str = "-"  # the key's name, else the client's address
    model: str | None = None  # as the client named it
    served: str | None = None  # the registry model it resolved to
    upstream: str | None = None  # the replica that answered
    first_byte_at: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # of the prompt's, read from the upstream's cache
    upstream_error: str | None = None  # refused | timeout | failed | too_large | malformed
    dropped_chunks: int = 0  # stream events that were not JSON, dropped
    redacted: int = 0  # secrets replaced in the prompt before it went out (core/redact.py)
    # What the request stages did to the turn (core/turn.py): "command" (llproxy
    # answered a command itself), "tool_loop_warn" (a note added), "tool_loop_break".
    stage: str | None = None
    # The dialect the answer came in: "openai" (the internal form), or the client's own
    # when a backend in that dialect passed the request on untranslated.
    answered_in: str = "openai"
    # Reads the answer's usage at accounting time, from what the answer kept for it: after
    # the client has its bytes, so parsing a long completion does not delay them. It
    # holds no reference back to the record: no cycle to collect.
    read_usage: Callable[[], Any] | None = None
    # Kept only when bodies are logged (-vv) or captured.
    request_body: bytes | None = None
    response_body: bytes | None = None
    # Kept only for the wire capture: a streamed answer's bytes as the client got them,
    # the internal (OpenAI-shaped) request routed, and the upstream's answer as it came.
    response_chunks: list[bytes] | None = None
    upstream_request: bytes | None = None
    upstream_chunks: list[bytes] | None = None

    def take_usage(self, document: Any) -> bool:
        """Record the `usage` of a decoded answer or chunk; False when it has none."""
        numbers = usage_numbers(document)
        if numbers is None:
            return False
        self.prompt_tokens, self.completion_tokens = numbers
        self.cached_tokens = cached_tokens(document)
        return True
