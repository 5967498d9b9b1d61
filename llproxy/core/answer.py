"""An upstream's answer made whole and checked once, before any dialect reads it.

A whole answer to a route llproxy reads (chat, completions, embeddings) is decoded and its
shape checked here: every dialect then reads `reply.document`, and a cut body, invalid
JSON, NaN or a member of the wrong type is a 502 `upstream_malformed` in the client's
dialect, never an empty success. An upstream that answers in the other form is made to
answer in the one asked for: a stream to a request for a whole answer is collected into
one, and a whole answer to a stream request becomes a stream of one chunk.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from .call import JSON, Reply
from .errors import UpstreamFailed, UpstreamMalformed, UpstreamUnreachable
from .record import RequestRecord
from .shape import CHAT, COMPLETIONS, READ_ROUTES, answer_problem
from .sse import ChoiceReader, ToolCalls

JSON_TYPE = JSON.decode()


async def as_asked(
    reply: Reply, route: str, stream: bool, record: RequestRecord, limit: int
) -> None:
    """The reply in the form the client asked for, its shape checked: a whole answer gets
    its `document`; a stream to a request for a whole answer is collected into one (a
    stream asked for is checked chunk by chunk as its dialect reads it)."""
    # An answer passed on in the client's own dialect (a cloud back-end of that dialect)
    # is not an OpenAI answer: that dialect reads it as it came.
    if reply.status >= 400 or route not in READ_ROUTES or record.answered_in != "openai":
        return
    if reply.stream is not None:
        if stream or route not in (CHAT, COMPLETIONS):
            return
        await collect(reply, route, record, limit)
    check(reply, route, record)


def check(reply: Reply, route: str, record: RequestRecord) -> None:
    """Decode a whole answer into `reply.document`; UpstreamMalformed when it is not a
    well-formed answer to `route`."""
    try:
        document = orjson.loads(reply.body)  # NaN and Infinity are not JSON: refused
    except orjson.JSONDecodeError as exc:
        record.upstream_error = "malformed"
        raise UpstreamMalformed(f"the upstream's answer is not valid JSON: {exc}") from None
    if (problem := answer_problem(document, route)) is not None:
        record.upstream_error = "malformed"
        raise UpstreamMalformed(f"the upstream's answer is malformed: {problem}")
    reply.document = document
    if reply.media_type != JSON_TYPE:  # JSON whatever the upstream called it
        reply.media_type = JSON_TYPE
        reply.headers.pop("Content-Type", None)


async def collect(reply: Reply, route: str, record: RequestRecord, limit: int) -> None:
    """A streamed answer read to its end and made into the whole answer it stands for;
    its total size is held to `limit` like a whole answer's."""
    source = reply.stream
    assert source is not None
    collector = Collector(record, reply.model_id)
    size = 0
    chunk = reply.body
    while chunk:
        size += len(chunk)
        if size > limit:
            record.upstream_error = "too_large"
            raise UpstreamUnreachable(
                f"the upstream's streamed answer is larger than {limit} bytes",
                code="upstream_too_large",
            )
        collector.feed(chunk)
        if source.ended:
            break
        chunk = await source.next()
    document = collector.finish(route)
    reply.stream = None  # read to its end: its connection is back in the pool
    reply.body = orjson.dumps(document)
    reply.media_type = JSON_TYPE
    reply.headers.pop("Content-Type", None)


class Collector:
    """The first choice of a chat or completions stream, gathered into one answer."""

    def __init__(self, record: RequestRecord, model_id: str) -> None:
        self.record = record
        self.model_id = model_id
        self.reader = ChoiceReader(record)
        self.texts: dict[str, list[str]] = {}
        self.calls = ToolCalls()
        self.ending: dict[str, Any] = {}  # finish_reason, and vLLM's stop_reason

    def feed(self, chunk: bytes) -> None:
        self._take(*self.reader.feed(chunk))

    def _take(self, choices: list[dict[str, Any]], failure: bytes | None) -> None:
        for choice in choices:
            delta = choice.get("delta")
            parts = delta if isinstance(delta, dict) else {"content": choice.get("text")}
            for name in ("content", "reasoning_content", "reasoning"):
                if isinstance(text := parts.get(name), str) and text:
                    self.texts.setdefault(name, []).append(text)
            if isinstance(delta, dict) and delta.get("tool_calls"):
                self.calls.add(delta)
            for name in ("finish_reason", "stop_reason"):
                if choice.get(name) is not None:
                    self.ending[name] = choice[name]
        if failure is not None:
            error = UpstreamFailed(502, failure)
            if self.reader.malformed is not None:
                raise UpstreamMalformed(error.message)
            raise error

    def finish(self, route: str) -> dict[str, Any]:
        self._take(*self.reader.rest())
        texts = {name: "".join(parts) for name, parts in self.texts.items()}
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": None}
        choice |= self.ending
        if route == COMPLETIONS:
            choice["text"] = texts.get("content", "")
            kind = "text_completion"
        else:
            message: dict[str, Any] = {"role": "assistant", "content": texts.get("content")}
            for name in ("reasoning_content", "reasoning"):
                if name in texts:
                    message[name] = texts[name]
            if self.calls:
                message["tool_calls"] = [
                    {
                        "id": call.id or f"call_{secrets.token_hex(8)}",
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                    for call in self.calls.in_order()
                ]
            choice["message"] = message
            kind = "chat.completion"
        document: dict[str, Any] = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [choice],
        }
        record = self.record
        if record.prompt_tokens is not None or record.completion_tokens is not None:
            prompt, completion = record.prompt_tokens or 0, record.completion_tokens or 0
            document["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        return document


def as_stream(reply: Reply, route: str) -> bytes:
    """A whole answer (already checked) as the stream it would have been: one chunk with
    each choice's message as its delta, the usage chunk, and `[DONE]`."""
    document = reply.document
    if document is None:
        raise UpstreamMalformed("the upstream's answer is not a stream")
    base = {k: document[k] for k in ("id", "created", "model") if k in document}
    kind = "text_completion" if route == COMPLETIONS else "chat.completion.chunk"
    choices = []
    for choice in document["choices"]:
        rest = {k: v for k, v in choice.items() if k != "message"}
        if "message" in choice:
            rest["delta"] = _as_delta(choice["message"])
        choices.append(rest)
    events = [{**base, "object": kind, "choices": choices}]
    if document.get("usage") is not None:
        events.append({**base, "object": kind, "choices": [], "usage": document["usage"]})
    return b"".join(b"data: " + orjson.dumps(event) + b"\n\n" for event in events) + (
        b"data: [DONE]\n\n"
    )


def _as_delta(message: dict[str, Any]) -> dict[str, Any]:
    """A message as a delta: its tool calls numbered, their arguments a string, as a
    stream's fragments carry them."""
    delta = dict(message)
    calls = message.get("tool_calls")
    if calls:
        delta["tool_calls"] = [
            {
                **call,
                "index": i,
                "function": {
                    **call.get("function", {}),
                    "arguments": _arguments(call.get("function", {}).get("arguments")),
                },
            }
            for i, call in enumerate(calls)
        ]
    return delta


def _arguments(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    return "" if arguments is None else orjson.dumps(arguments).decode()
