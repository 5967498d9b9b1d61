"""Client dialects: pure translators between what a client speaks and the internal form.

A dialect declares its routes (and whether each needs a key), turns a request into a
Translation (what to ask a model, or a 4xx in its own shape), and turns the model's answer,
its stream and any error into the client's shapes. It never touches the network: the
server reads and writes, the router and backends answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..core.call import Payload, Reply
from ..core.errors import InvalidRequest, ProxyError, UpstreamFailed, UpstreamMalformed
from ..core.record import RequestRecord
from ..core.registry import Model
from ..core.sse import ChoiceReader, json_document, only_text
from ..core.values import request_value

JSON_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # as the server routes it, e.g. "/v1/models/{name}"
    # "call": a model answers; "models"/"model": the registry's listing; "local": the
    # dialect answers itself (with what the Catalog tells it).
    kind: str
    target: str = ""  # for a call: the OpenAI route below /v1/ it goes to
    needs_key: bool = True
    # The route is this dialect's only for requests carrying this header (two dialects
    # share `GET /v1/models`; Anthropic's clients send `anthropic-version`).
    header: str | None = None
    # A query parameter that may carry the client's key (Gemini's `?key=`); it is never
    # logged (the access log has the path only) nor forwarded.
    key_param: str | None = None


@request_value
class Incoming:
    """A request as a dialect sees it: its parts, no server objects. (What no dialect
    reads is left out: each field costs every request.)"""

    headers: Mapping[str, str]
    body: bytes
    params: Mapping[str, str] = field(default_factory=dict)  # the path's ({name})
    query: str = ""  # the raw query string

    @property
    def media_type(self) -> str:
        """The body's media type, lower case, without parameters."""
        return self.headers.get("Content-Type", "").partition(";")[0].strip().lower()


@request_value
class Answer:
    """An answer in the client's shape, made by the dialect itself."""

    status: int
    body: bytes
    media_type: str = JSON_TYPE
    headers: Mapping[str, str] = field(default_factory=dict)
    about: str | None = None  # a model the answer speaks of: it must exist for the client


class StreamTransform(Protocol):
    """A model's OpenAI stream, turned into the client's stream as the chunks arrive."""

    media_type: str

    def start(self) -> bytes:
        """What opens the stream, once: the server sends it with the headers when the
        model is slow to start; else the transform puts it before its first output."""
        ...

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes:
        """What closes the stream after the model's last chunk."""
        ...

    def fail(self, error: ProxyError) -> bytes:
        """The last bytes of a stream that failed after it started."""
        ...

    def keepalive(self) -> bytes:
        """What tells the client the stream is alive while the model is silent; b"" for a
        dialect that has none (its stream then opens only with the model's first chunk)."""
        ...


def list_field(body: Mapping[str, Any], name: str, param: str = "") -> list[Any]:
    """An optional list field of a client's body, [] when absent or null; a value of
    any other type is a 400 naming it (`param`, else the name), not a 500 further on."""
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        where = param or name
        raise InvalidRequest(f"'{where}' must be a list", param=where)
    return value


def added_text(choice: dict[str, Any]) -> str | None:
    """The text a choice adds to an answer's content when that is all it does, as most
    chunks of an answer do: translators give those their event from a template
    (measured: about half the time of the general path)."""
    added = only_text(choice)
    return added[1] if added is not None and added[0] == "content" and added[1] else None


def kept_headers(reply: Reply) -> dict[str, str]:
    """What an upstream's error answer keeps in every client's dialect: its Retry-After
    (a 429's or an overloaded server's), so clients wait as long as it asked."""
    value = reply.headers.get("Retry-After")
    return {"Retry-After": value} if value else {}


class ChoiceStream:
    """What every stream translated from a model's chat chunks shares: the chunks read
    into their first choices, each turned into the client's events by `_choice`, and an
    error event from the model's server ending the stream with `fail`; nothing follows
    that. A subclass sets `choices` and `done` and gives `start`, `_choice`, `_error`
    and `_end`."""

    choices: ChoiceReader
    done: bool

    def start(self) -> bytes:
        raise NotImplementedError

    def _choice(self, choice: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def _error(self, error: ProxyError) -> bytes:
        """The dialect's error event."""
        raise NotImplementedError

    def _end(self) -> bytes:
        """What closes a stream the model finished: open blocks, the gathered tool calls,
        the stop and the usage."""
        raise NotImplementedError

    def finish(self) -> bytes:
        if self.done:
            return b""
        last = self.start() + self._read(*self.choices.rest())
        if self.done:  # the last event was an error
            return last
        self.done = True
        return last + self._end()

    def fail(self, error: ProxyError) -> bytes:
        if self.done:
            return b""
        self.done = True
        return self.start() + self._error(error)

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        return self._read(*self.choices.feed(chunk))

    def _read(self, choices: list[dict[str, Any]], failure: bytes | None) -> bytes:
        if not choices and failure is None:
            return b""
        out = [self.start()]
        for choice in choices:
            out.append(self._choice(choice))
        if failure is not None:
            error: ProxyError = UpstreamFailed(502, failure)
            if self.choices.malformed is not None:
                error = UpstreamMalformed(error.message)
            out.append(self.fail(error))
        return b"".join(out)


class Translation(Protocol):
    """One request translated: what to ask a model, and how its answer goes back."""

    @property
    def model(self) -> str | None:
        """The name the client asked for; None: the default model."""

    @property
    def target(self) -> str:
        """The OpenAI route below /v1/ the call goes to."""

    @property
    def payload(self) -> Payload: ...

    @property
    def stream(self) -> bool: ...

    @property
    def early(self) -> bool:
        """The stream opens before the model's first chunk when that is slow to come (its
        transform has a keepalive)."""

    @property
    def thinking(self) -> bool:
        """Whether the client may be shown the model's reasoning: False where its dialect
        has a switch for it and the client did not ask (Ollama's `think: false`, an
        Anthropic request without `thinking`, Gemini without `includeThoughts`); the mending
        stages then drop it."""

    @property
    def relays_as_is(self) -> bool:
        """A whole answer to a stream request goes back as it is (OpenAI), not as a
        stream."""

    def answer(self, reply: Reply, record: RequestRecord) -> Answer:
        """A whole answer (status < 400) in the client's shape."""
        ...

    def upstream_error(self, reply: Reply) -> Answer:
        """An error the model's server answered, in the client's shape."""
        ...

    def stream_transform(self, record: RequestRecord, reply: Reply | None) -> StreamTransform:
        """The transform of this request's stream; `reply` is None when the stream opens
        before the model answered."""
        ...


class Catalog(Protocol):
    """What a dialect may ask about the models when it answers locally."""

    def listing(self) -> list[Mapping[str, Any]]:
        """The entries of the models the client may use (`id` is the name to call)."""
        ...

    def resolve(self, name: str) -> Model:
        """The model a name stands for; ProxyError when unknown or not allowed."""
        ...

    def seen(self, chat: Mapping[str, Any]) -> Mapping[str, Any]:
        """A chat as its model would see it: without llproxy's commands and its answers to
        them, which a token count must not count."""
        ...

    async def count_tokens(self, model: Model, chat: Mapping[str, Any]) -> int | None:
        """The tokens of a chat's prompt (messages and tools) as the model sees it,
        counted by its own server where it can; None else."""
        ...


class Dialect(Protocol):
    name: str

    @property
    def routes(self) -> Sequence[Route]: ...

    def translate(self, route: Route, incoming: Incoming) -> Translation | Answer:
        """The request as a call, an answer the dialect gives without a model (Ollama's
        load and unload), or a ProxyError (4xx) when it must not go upstream."""
        ...

    def error(self, error: ProxyError) -> Answer:
        """Any error in this dialect's shape."""
        ...

    def models(self, entries: Sequence[Mapping[str, Any]]) -> Answer:
        """The listing of the models a client may use."""
        ...

    def model(self, entry: Mapping[str, Any]) -> Answer:
        """One model's entry."""
        ...

    async def local(self, route: Route, incoming: Incoming, catalog: Catalog) -> Answer:
        """The answer to a route the dialect answers itself."""
        ...


def reasoning_text(part: Mapping[str, Any]) -> str:
    """A message's or delta's reasoning, as servers name it (`reasoning_content`, vLLM's
    and llama.cpp's; `reasoning`, others')."""
    value = part.get("reasoning_content") or part.get("reasoning")
    return value if isinstance(value, str) else ""


def arguments_object(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments (JSON text, or already an object) as an object; {} when
    they are not one (the dialects that take an object cannot carry anything else)."""
    parsed = json_document(arguments.encode()) if isinstance(arguments, str) else arguments
    return parsed if isinstance(parsed, dict) else {}
