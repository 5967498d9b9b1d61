"""The internal form of a request and of its answer, between every layer.

A dialect turns what a client sent into a Call, OpenAI-shaped whatever the client spoke; a
Backend answers a Call for one replica with a Reply; the dialect turns the Reply into the
client's own answer. Nothing here knows HTTP servers, clients or terminals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from .errors import InvalidRequest
from .multipart import FormBody
from .record import RequestRecord
from .registry import Model, Replica

JSON = b"application/json"
# Every answer of an llproxy names its running instance, and every request it sends names
# it in Via: discovery skips itself, and a request that comes round again is refused.
INSTANCE_HEADER = "X-Llproxy-Instance"


def via_name(instance: str) -> str:
    return f"llproxy-{instance}"


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; InvalidRequest when it is not."""
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


@dataclass(frozen=True, slots=True)
class Native:
    """A client's request as it sent it, beside its translation: a backend that speaks the
    client's dialect passes this on instead, unchanged but for the model."""

    dialect: str
    body: dict[str, Any]
    headers: Mapping[str, str]  # the dialect's own request headers worth forwarding


class JsonPayload:
    """A JSON body; each replica gets it with its own model id."""

    content_type = JSON

    def __init__(self, body: dict[str, Any], native: Native | None = None) -> None:
        self.body = body
        self.native = native

    @property
    def model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) else None

    def encode(self, model_id: str) -> bytes:
        # Only `model` changes; the rest of the client's body goes as it was sent.
        return orjson.dumps({**self.body, "model": model_id})


class FormPayload:
    """A multipart upload (audio, image edits): every part but `model` byte for byte."""

    def __init__(self, form: FormBody, content_type: str, model: str | None) -> None:
        self.form = form
        self.content_type = content_type.encode("latin-1")
        self.model = model

    def encode(self, model_id: str) -> bytes:
        return self.form.with_field("model", model_id)


Payload = JsonPayload | FormPayload

# Characters per token when a count must be estimated (a common rule of thumb; it counts
# JSON punctuation too, so it errs towards more tokens).
CHARS_PER_TOKEN = 4


def estimate_tokens(text: str | bytes) -> int:
    return max(1, len(text) // CHARS_PER_TOKEN)


def within_context(payload: Payload, context_length: int | None) -> Payload:
    """A JSON call whose max_tokens (or max_completion_tokens) asks for more than the
    model's context leaves after the prompt (estimated), with it lowered to what is left:
    clients such as Claude Code ask for 32,000 or 64,000 whatever the model."""
    if context_length is None or not isinstance(payload, JsonPayload):
        return payload
    body = payload.body
    asked = {
        name: body[name]
        for name in ("max_tokens", "max_completion_tokens")
        if isinstance(body.get(name), int)
    }
    if not asked:
        return payload
    prompt = {k: body[k] for k in ("messages", "prompt", "tools") if k in body}
    room = context_length - estimate_tokens(orjson.dumps(prompt))
    lowered = {name: room for name, value in asked.items() if value > room}
    if room < 1 or not lowered:
        return payload  # nothing fits or nothing to lower: the upstream's own answer
    return JsonPayload({**body, **lowered}, payload.native)


@dataclass(frozen=True, slots=True)
class Call:
    """One request for a model, as every backend understands it."""

    route: str  # the OpenAI route below /v1/ it goes to: "chat/completions", "embeddings", …
    model: str  # the registry name it is for
    payload: Payload
    stream: bool = False
    via: str = ""  # the proxies it passed through before this one (the client's Via)
    # Request headers of the upstream's own dialect, beside its fixed ones (a passed-on
    # Anthropic request's anthropic-version and anthropic-beta).
    headers: Mapping[str, str] = field(default_factory=dict)
    # A query string a backend's own route needs ("?alt=sse" for Gemini's SSE stream);
    # never a client's (a client's path cannot carry one upstream).
    query: str = ""


class Stream(Protocol):
    """The rest of a streamed answer, chunk by chunk, as it arrives."""

    @property
    def ended(self) -> bool:
        """Whether the answer's end came with the chunk last read."""

    async def next(self) -> bytes:
        """The next chunk; b"" at the end. Raises ProxyError when the answer fails."""

    def close(self) -> None:
        """The answer is not wanted (any more): stop it, so the model stops generating."""


@dataclass(slots=True)
class Reply:
    """A backend's answer, once its first byte is in: a whole body, or the first chunk of
    a stream and the stream."""

    status: int
    media_type: str  # "application/json", "text/event-stream", "audio/mpeg", …
    body: bytes = b""  # the whole answer, or the stream's first chunk
    stream: Stream | None = None
    headers: dict[str, str] = field(default_factory=dict)  # relayed as they are
    model_id: str = ""  # the id the replica knows the model by (set by the router)
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def on_close(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    def close(self) -> None:
        """Done with the answer, whole or not: whatever it holds is let go."""
        if self.stream is not None:
            self.stream.close()
        closers, self._closers = self._closers, []
        for closer in closers:
            closer()


class Backend(Protocol):
    """What answers Calls for one kind of replica (an OpenAI HTTP server, an operator)."""

    async def send(self, call: Call, replica: Replica, record: RequestRecord) -> Reply:
        """The replica's answer once its first byte is in. ReplicaUnavailable when it
        was sent nothing (another replica may be tried); other ProxyErrors else."""
        ...


class TokenCounter(Protocol):
    """What counts tokens with a model's own server, for a kind of replica."""

    async def count_tokens(self, model: Model, text: str) -> int | None:
        """The count of `text`; None when the server cannot say (then it is estimated)."""
        ...
