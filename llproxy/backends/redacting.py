"""A backend's calls to replicas marked `redact` with the known secrets taken out first
(core/redact.py); the request's record counts the replacements for the metric and the
access log. Every backend the router holds is wrapped, so a cloud back-end's passed-on
client request is covered as well as the translated call, and so is every token counter
(a cloud's count is the prompt sent to it too)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.call import Backend, Call, Reply, TokenCounter
from ..core.record import RequestRecord
from ..core.redact import Redactor
from ..core.registry import Model, Replica


class Redacting:
    def __init__(self, backend: Backend, redactor: Redactor) -> None:
        self.backend = backend
        self.redactor = redactor

    async def send(self, call: Call, replica: Replica, record: RequestRecord) -> Reply:
        if replica.upstream.redact:
            call, count = self.redactor.call(call, replica.backend)
            # Once per request: a replica tried after one that refused redacts the same.
            record.redacted = max(record.redacted, count)
        return await self.backend.send(call, replica, record)


class RedactingCounter:
    def __init__(self, counter: TokenCounter, redactor: Redactor) -> None:
        self.counter = counter
        self.redactor = redactor

    async def count_tokens(self, model: Model, chat: Mapping[str, Any]) -> int | None:
        if model.replicas and model.replicas[0].upstream.redact:
            chat = self.redactor.value(chat)[0]
        return await self.counter.count_tokens(model, chat)
