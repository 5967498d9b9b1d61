"""Answers mended on their way to the client, once for every dialect and back-end: on the
internal (OpenAI) form, after core/answer.py made the reply the form the client asked
for and before the client's dialect reads it. Tool calls written as text become real
ones (toolcalls.py), inline thinking becomes reasoning (thinking.py), a stream that
repeats itself is cut (loops.py); policy.py says which stages an answer goes through.
An answer no stage is on for is not touched at all."""

from __future__ import annotations

import orjson

from ..call import Reply
from ..record import RequestRecord
from .loops import LoopLimits
from .plan import Plan, plan_for
from .policy import Repair
from .stream import MendedStream
from .whole import mend_document


async def mend(reply: Reply, plan: Plan, record: RequestRecord) -> None:
    """The reply with its stream wrapped in the stages, or its whole answer mended (its
    `document` and body both)."""
    if reply.status >= 400 or record.answered_in != "openai":
        return
    if reply.stream is not None:
        stream = MendedStream(reply.stream, plan, record)
        reply.body = await stream.first(reply.body)
        reply.stream = stream
    elif isinstance(reply.document, dict) and mend_document(reply.document, plan, record):
        reply.body = orjson.dumps(reply.document)


__all__ = ["LoopLimits", "Plan", "Repair", "mend", "plan_for"]
