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
from ..core.errors import ProxyError
from ..core.record import RequestRecord

JSON_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # as the server routes it, e.g. "/v1/models/{name}"
    kind: str  # "call": a model answers; "models"/"model": the registry's listing
    target: str = ""  # for a call: the OpenAI route below /v1/ it goes to
    needs_key: bool = True


@dataclass(frozen=True, slots=True)
class Incoming:
    """A request as a dialect sees it: its parts, no server objects."""

    path_params: Mapping[str, str]
    query: Mapping[str, str]
    headers: Mapping[str, str]
    content_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer in the client's shape, made by the dialect itself."""

    status: int
    body: bytes
    media_type: str = JSON_TYPE
    headers: Mapping[str, str] = field(default_factory=dict)


class StreamTransform(Protocol):
    """A model's OpenAI stream, turned into the client's stream as the chunks arrive."""

    media_type: str

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes:
        """What closes the stream after the model's last chunk."""
        ...

    def fail(self, error: ProxyError) -> bytes:
        """The last bytes of a stream that failed after it started."""
        ...

    def keepalive(self) -> bytes:
        """What tells the client the stream is alive while the model is silent."""
        ...


class Translation(Protocol):
    """One request translated: what to ask a model, and how its answer goes back."""

    model: str | None  # the name the client asked for; None: the default model
    target: str  # the OpenAI route below /v1/ the call goes to
    payload: Payload
    stream: bool

    def answer(self, reply: Reply, record: RequestRecord) -> Answer:
        """A whole answer (status < 400) in the client's shape."""
        ...

    def upstream_error(self, reply: Reply) -> Answer:
        """An error the model's server answered, in the client's shape."""
        ...

    def stream_transform(self, reply: Reply, record: RequestRecord) -> StreamTransform: ...


class Dialect(Protocol):
    name: str

    @property
    def routes(self) -> Sequence[Route]: ...

    def translate(self, route: Route, incoming: Incoming) -> Translation:
        """The request as a call, or a ProxyError (4xx) when it must not go upstream."""
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
