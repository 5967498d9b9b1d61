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
from .values import request_value

JSON = b"application/json"
# Every answer of an llproxy names its running instance, and every request it sends names
# it in Via: discovery skips itself, and a request that comes round again is refused.
INSTANCE_HEADER = "X-Llproxy-Instance"
# The registry model that answered (the one a fallback chain fell to), on every model answer.
MODEL_HEADER = "X-Llproxy-Model"
# What an upstream's error says of when to try again: passed on to the client.
RETRY_HEADERS = ("Retry-After", "retry-after-ms")


def via_name(instance: str) -> str:
    return f"llproxy-{instance}"


# orjson reads JSON nested up to 1,024 levels but writes at most 254: a client's body
# between the two parses, and is refused where llproxy writes it on (encode_client).
MAX_DEPTH = 254


def encode_client(value: Any) -> bytes:
    """What a client sent (or was made from it) as JSON; InvalidRequest when it nests too
    deeply to be written. Catching the encoder's own refusal costs nothing on the way of
    every request, where a depth check would walk every body."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise InvalidRequest(
            f"request body nests deeper than {MAX_DEPTH} levels", code="nested_too_deeply"
        ) from None


def via_hops(via: str) -> frozenset[str]:
    """The proxies a Via header names: `1.1 llproxy-ab, 1.1 nginx` → {llproxy-ab, nginx}."""
    return frozenset(hop[1] for part in via.split(",") if len(hop := part.split()) >= 2)


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; InvalidRequest when it is not."""
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


@request_value
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
        self._encoded: tuple[str, bytes] | None = None  # for which model id

    def prepare(self, model_id: str) -> None:
        """Encode the body for the id the replicas most likely know the model by, before
        one is chosen: a body nested too deeply to be written is a 400 here
        (encode_client), never a replica's failure. A replica of another id has it
        encoded again."""
        if self._encoded is None or self._encoded[0] != model_id:
            self._encoded = (model_id, encode_client({**self.body, "model": model_id}))

    @property
    def model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) else None

    def encode(self, model_id: str) -> bytes:
        # Only `model` changes; the rest of the client's body goes as it was sent.
        self.prepare(model_id)
        assert self._encoded is not None
        return self._encoded[1]


class FormPayload:
    """A multipart upload (audio, image edits): every part but `model` byte for byte."""

    def __init__(self, form: FormBody, content_type: str, model: str | None) -> None:
        self.form = form
        self.content_type = content_type.encode("latin-1")
        self.model = model

    def prepare(self, model_id: str) -> None:
        """Nothing to do before a replica is chosen: the form was parsed already."""

    def encode(self, model_id: str) -> bytes:
        return self.form.with_field("model", model_id)


Payload = JsonPayload | FormPayload

# Characters per token when a count must be estimated (a common rule of thumb).
CHARS_PER_TOKEN = 4


def estimate_tokens(text: str | bytes) -> int:
    return max(1, len(text) // CHARS_PER_TOKEN)


def prompt_text(chat: Mapping[str, Any]) -> str:
    """What a model reads of a chat (the texts of its messages and tool calls, its tools'
    names, descriptions and schemas), without the request's JSON around it: what an
    estimate counts when the model's server cannot."""
    pieces: list[str] = []
    for message in chat.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            pieces.append(content)
        elif isinstance(content, list):
            pieces += [p["text"] for p in content if isinstance(p, dict) and _is_text(p)]
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                pieces += [str(function.get(key) or "") for key in ("name", "arguments")]
    for tool in chat.get("tools") or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict):
            pieces += [str(function.get(key) or "") for key in ("name", "description")]
            # Too deep to write on is the client's 400, as the same body to the model is.
            pieces.append(encode_client(function.get("parameters")).decode())
    return "\n".join(pieces)


def _is_text(part: Mapping[str, Any]) -> bool:
    return isinstance(part.get("text"), str)


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
    room = context_length - estimate_tokens(encode_client(prompt))
    lowered = {name: room for name, value in asked.items() if value > room}
    if room < 1 or not lowered:
        return payload  # nothing fits or nothing to lower: the upstream's own answer
    return JsonPayload({**body, **lowered}, payload.native)


@request_value
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
    # What the conversation set for itself with `!/set(name=value)` commands in its own
    # history (names as typed, lower case: "loop-detection" → "false"): llproxy keeps no
    # state, so each turn's call carries them; answer stages read their switches here.
    settings: Mapping[str, str] = field(default_factory=dict)


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
    replica: Replica | None = None  # the replica that answered (set by the router)
    # A whole answer's JSON, once core.answer has checked its shape: what dialects read.
    document: Any = None
    # The rest may be minutes away (a person answers): the client's status and headers
    # go at once, even when the first chunk translates to nothing (Ollama's NDJSON).
    awaited: bool = False
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

    async def count_tokens(self, model: Model, chat: Mapping[str, Any]) -> int | None:
        """The tokens of a chat's prompt (its messages and tools); None when the server
        cannot say (then it is estimated)."""
        ...
