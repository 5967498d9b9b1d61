"""A backend's calls to replicas marked `redact` with the known secrets taken out first
(core/redact.py); the request's record counts the replacements for the metric and the
access log. Every backend the router holds is wrapped, so a cloud back-end's passed-on
client request is covered as well as the translated call."""

from __future__ import annotations

from ..core.call import Backend, Call, Reply
from ..core.record import RequestRecord
from ..core.redact import Redactor
from ..core.registry import Replica


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
