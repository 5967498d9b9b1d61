"""The OpenAI dialect: chat completions, completions, embeddings, audio, images and the
other inference routes, passed through almost as they are (OpenAI is the internal form).

Bodies are checked only for what an upstream would reject anyway, or what would make
llproxy misroute; every other field passes untouched. A stream is relayed chunk by chunk,
renamed to the model name the client asked for, and without the usage chunk llproxy asked
for when the client did not.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from ..core.call import FormPayload, JsonPayload, Payload, Reply, json_object
from ..core.errors import InvalidRequest, ProxyError, UpstreamMalformed
from ..core.multipart import FormBody
from ..core.record import RequestRecord
from ..core.sse import (
    EventRelay,
    PassThrough,
    json_document,
    last_usage_event,
    model_rename,
    usage_of_json_answer,
)
from . import JSON_TYPE, Answer, Catalog, Incoming, Route, kept_headers

# The routes below /v1/ forwarded to a model (the config's `forward_paths` adds to them).
INFERENCE_PATHS = (
    "chat/completions",
    "completions",
    "embeddings",
    "rerank",
    "reranking",
    "score",
    "moderations",
    "audio/transcriptions",
    "audio/translations",
    "audio/speech",
    "images/generations",
    "images/edits",
    "images/variations",
)
# Where an upstream can add a usage chunk to a stream (stream_options.include_usage).
_USAGE_ROUTES = ("chat/completions", "completions")


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def error_of(error: ProxyError) -> bytes:
    return error_body(error.message, error.type, error.param, error.code)


class OpenAIDialect:
    name = "openai"

    def __init__(self, forward_paths: Sequence[str] = ()) -> None:
        targets = dict.fromkeys((*INFERENCE_PATHS, *forward_paths))
        self.routes = (
            Route("GET", "/v1/models", "models"),
            Route("GET", "/v1/models/{name}", "model"),
            *(Route("POST", f"/v1/{target}", "call", target) for target in targets),
        )

    def translate(self, route: Route, incoming: Incoming) -> OpenAITranslation:
        payload: Payload
        if incoming.media_type == "multipart/form-data":
            form = FormBody(incoming.body, incoming.headers.get("Content-Type", ""))
            model = form.field("model")
            if model is not None and not model:
                raise InvalidRequest("'model' must be a non-empty string", param="model")
            payload = FormPayload(form, incoming.headers.get("Content-Type", ""), model)
            return OpenAITranslation(route.target, payload, model, stream=False)
        body = json_object(incoming.body)
        validate(route.target, body)
        stream = body.get("stream") is True
        hide_usage = False
        if stream and route.target in _USAGE_ROUTES:
            body, hide_usage = _with_usage_chunk(body)
        payload = JsonPayload(body)
        return OpenAITranslation(route.target, payload, payload.model, stream, hide_usage)

    def error(self, error: ProxyError) -> Answer:
        return Answer(error.status, error_of(error), headers=error.headers())

    def models(self, entries: Sequence[Mapping[str, Any]]) -> Answer:
        return Answer(200, listing_body(entries))

    def model(self, entry: Mapping[str, Any]) -> Answer:
        return Answer(200, orjson.dumps(entry))

    async def local(self, route: Route, incoming: Incoming, catalog: Catalog) -> Answer:
        raise NotImplementedError(route.path)  # it declares no local route


def listing_body(entries: Sequence[Mapping[str, Any]]) -> bytes:
    """The body of GET /v1/models for these model entries."""
    return orjson.dumps({"object": "list", "data": entries})


def _with_usage_chunk(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The body asking the upstream for the usage chunk, and whether it must be hidden
    from the client (which did not ask for it)."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body, False
    merged = (
        {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
    )
    return {**body, "stream_options": merged}, True


class OpenAITranslation:
    early = False  # no keepalive: a stream opens with the model's first chunk
    thinking = True  # reasoning is a member of its own, which clients may ignore

    def __init__(
        self,
        target: str,
        payload: Payload,
        model: str | None,
        stream: bool,
        hide_usage: bool = False,
    ) -> None:
        self.target = target
        self.payload = payload
        self.model = model
        self.stream = stream
        self.hide_usage = hide_usage
        # A whole answer to a stream request is made a stream where llproxy reads the
        # answers (chat, completions); other routes' answers go back as they are.
        self.relays_as_is = target not in _USAGE_ROUTES

    def answer(self, reply: Reply, record: RequestRecord) -> Answer:
        body = reply.body
        if reply.media_type == JSON_TYPE:
            rename = model_rename(reply.model_id, record.model or "")
            if rename is not None:
                body = rename.apply(body)
            document = reply.document
            record.read_usage = (
                (lambda: document) if document is not None else lambda: usage_of_json_answer(body)
            )
        return Answer(reply.status, body, reply.media_type, reply.headers)

    def upstream_error(self, reply: Reply) -> Answer:
        """An OpenAI-shaped error passes as it is; anything else is wrapped so it is."""
        parsed = json_document(reply.body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            return Answer(reply.status, reply.body, headers=kept_headers(reply))
        message: Any = parsed.get("message") if isinstance(parsed, dict) else None
        if not isinstance(message, str):
            text = reply.body[:1000].decode("utf-8", "replace").strip()
            message = text or f"upstream status {reply.status}"
        body = error_body(message, "upstream_error", None, reply.status)
        return Answer(reply.status, body, headers=kept_headers(reply))

    def stream_transform(self, record: RequestRecord, reply: Reply | None) -> OpenAIStream:
        assert reply is not None  # an OpenAI stream never opens before the model answers
        rename = model_rename(reply.model_id, record.model or "")
        relay: EventRelay | PassThrough
        shaped = self.target in _USAGE_ROUTES  # chunks llproxy reads: their shape checked
        if self.hide_usage or rename is not None:
            relay = EventRelay(record, rename, self.hide_usage, shaped)
        else:
            relay = PassThrough(record, shaped)
        if not self.hide_usage:
            # The relay's last reads, not the relay: it holds the record (no cycle).
            record.read_usage = functools.partial(last_usage_event, relay.recent)
        return OpenAIStream(relay)


class OpenAIStream:
    """The relay, ended by an error event when a chunk is malformed (or the stream cut
    inside one); nothing follows that."""

    media_type = "text/event-stream"

    def __init__(self, relay: EventRelay | PassThrough) -> None:
        self.relay = relay
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        out = self.relay.feed(chunk)
        return out if self.relay.problem is None else out + self._malformed()

    def finish(self) -> bytes:
        if self.done:
            return b""
        out = self.relay.finish()
        if self.relay.problem is not None:
            return out + self._malformed()
        self.done = True
        return out

    def _malformed(self) -> bytes:
        problem = self.relay.problem
        return self.fail(UpstreamMalformed(f"the upstream sent a malformed chunk: {problem}"))

    def start(self) -> bytes:
        return b""

    def fail(self, error: ProxyError) -> bytes:
        if self.done:
            return b""
        self.done = True
        return b"data: " + error_of(error) + b"\n\n"

    def keepalive(self) -> bytes:
        # None: a relayed stream may be cut mid-event, where a comment would corrupt it.
        return b""


# --- validation ------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_common(body: dict[str, Any]) -> None:
    if "model" in body and not (isinstance(body["model"], str) and body["model"]):
        raise InvalidRequest("'model' must be a non-empty string", param="model")
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    temperature = body.get("temperature")
    if temperature is not None and not (_is_number(temperature) and 0 <= temperature <= 2):
        raise InvalidRequest("'temperature' must be a number between 0 and 2", param="temperature")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and not _is_positive_int(value):
            raise InvalidRequest(f"'{name}' must be a positive integer", param=name)


def validate_chat(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequest(
                f"'messages[{i}].role' must be a non-empty string", param=f"messages[{i}].role"
            )


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(token, int) and not isinstance(token, bool) for token in value
    )


def validate_completion(body: dict[str, Any]) -> None:
    if "prompt" not in body or body["prompt"] is None:
        raise InvalidRequest("'prompt' is required", param="prompt")
    prompt = body["prompt"]
    # A string, a list of strings, a list of token ids, or a list of such lists.
    if not (
        isinstance(prompt, str)
        or _is_token_list(prompt)
        or (
            isinstance(prompt, list)
            and all(isinstance(item, str) or _is_token_list(item) for item in prompt)
        )
    ):
        raise InvalidRequest(
            "'prompt' must be a string, a list of strings, or a list of token ids (or of "
            "such lists)",
            param="prompt",
        )


PATH_VALIDATORS = {
    "chat/completions": validate_chat,
    "completions": validate_completion,
}


def validate(path: str, body: dict[str, Any]) -> None:
    """Raise InvalidRequest (with param) for a body that must not go upstream."""
    validate_common(body)
    specific = PATH_VALIDATORS.get(path)
    if specific is not None:
        specific(body)
