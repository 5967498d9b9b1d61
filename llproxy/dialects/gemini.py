"""The Gemini dialect (the `google-genai` SDK, tools built on it) over OpenAI chat models.

A `generateContent` request becomes a chat body: `systemInstruction` leads, `model` turns
are the assistant's, `functionCall` parts become tool calls with ids of llproxy's making
and `functionResponse` parts the tool messages answering them, paired by name and order
(Gemini has no ids). The answer becomes a GenerateContentResponse (thought parts first,
marked `thought`); a stream is one response per event, as SSE frames (`alt=sse`) or as
one JSON array written element by element. The model is named in the path, with the
method after its last colon, so names with a colon (`name:tag`) work.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs

import orjson

from ..core.call import (
    JsonPayload,
    Native,
    Reply,
    encode_client,
    estimate_tokens,
    json_object,
    prompt_text,
)
from ..core.errors import InvalidRequest, ModelNotFound, ProxyError, UpstreamFailed
from ..core.record import RequestRecord
from ..core.sse import (
    EVENT_END,
    ChoiceReader,
    EventSplitter,
    ToolCalls,
    event_data,
    json_document,
)
from ..core.usage import from_gemini
from . import (
    Answer,
    Catalog,
    ChoiceStream,
    Incoming,
    Route,
    added_text,
    arguments_object,
    kept_headers,
    list_field,
    reasoning_text,
)

_PREFIXES = ("/v1beta", "/v1")
# The SDK lists models at `GET /v1/models`, OpenAI's path: these headers claim it.
_CLAIMS = ("x-goog-api-key", "x-goog-api-client")
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
    508: "ABORTED",
    529: "UNAVAILABLE",
}
_FINISH_REASONS = {"stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP"}
_FINISH_REASONS |= {"function_call": "STOP", "content_filter": "SAFETY"}


def status_name(status: int) -> str:
    return _STATUS_NAMES.get(status) or ("INTERNAL" if status >= 500 else "INVALID_ARGUMENT")


def error_body(status: int, message: str) -> bytes:
    return orjson.dumps(
        {"error": {"code": status, "message": message, "status": status_name(status)}}
    )


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _field(message: dict[str, Any], name: str) -> Any:
    """A field by its JSON name or its proto name, as Gemini's parser takes either:
    google-genai sends thinkingConfig's as `include_thoughts`, `thinking_budget`."""
    if name in message:
        return message[name]
    return message.get("".join("_" + c.lower() if c.isupper() else c for c in name))


class GeminiDialect:
    name = "gemini"

    def __init__(self) -> None:
        routes = []
        for prefix in _PREFIXES:
            calls = f"{prefix}/models/{{name}}"
            routes += [
                _route("POST", f"{calls}:generateContent", "call", "chat/completions"),
                _route("POST", f"{calls}:streamGenerateContent", "call", "chat/completions"),
                _route("POST", f"{calls}:embedContent", "call", "embeddings"),
                # The SDK's embed_content asks this one, with one request per text.
                _route("POST", f"{calls}:batchEmbedContents", "call", "embeddings"),
                _route("POST", f"{calls}:countTokens", "local"),
            ]
            # /v1beta/ is Gemini's own; /v1/models is OpenAI's too, claimed by a header.
            for claim in (None,) if prefix == "/v1beta" else _CLAIMS:
                routes += [
                    _route("GET", f"{prefix}/models", "models", header=claim),
                    _route("GET", f"{prefix}/models/{{name}}", "model", header=claim),
                ]
        self.routes = tuple(routes)

    def translate(self, route: Route, incoming: Incoming) -> GeminiTranslation:
        model = incoming.params.get("name", "").removeprefix("models/")
        if not model:
            raise InvalidRequest("the model is named in the path: models/{model}:method")
        body = json_object(incoming.body)
        if route.target == "embeddings":
            batch = route.path.endswith(":batchEmbedContents")
            requests = body.get("requests") if batch else [body]
            if not isinstance(requests, list):
                raise InvalidRequest("requests: must be a list", param="requests")
            texts = [
                _texts(list_field(_dict(_dict(r).get("content")), "parts", "content.parts"))
                for r in requests
            ]
            payload = JsonPayload({"model": model, "input": texts if batch else texts[0]})
            return GeminiTranslation("embeddings", payload, model, False, False, batch)
        chat = to_chat(body, model)
        native = Native(self.name, body, {})  # what a Gemini back-end is given instead
        stream = route.path.endswith(":streamGenerateContent")
        if stream:
            chat["stream"] = True
            chat["stream_options"] = {"include_usage": True}
        sse = parse_qs(incoming.query).get("alt") == ["sse"]
        translation = GeminiTranslation(
            "chat/completions", JsonPayload(chat, native), model, stream, sse
        )
        # Gemini returns thought parts only when asked: includeThoughts absent is false.
        thinking = _dict(_dict(body.get("generationConfig")).get("thinkingConfig"))
        translation.thinking = _field(thinking, "includeThoughts") is True
        return translation

    def error(self, error: ProxyError) -> Answer:
        return Answer(
            error.status, error_body(error.status, error.message), headers=error.headers()
        )

    def models(self, entries: Sequence[Mapping[str, Any]]) -> Answer:
        return Answer(200, orjson.dumps({"models": [_model_entry(e) for e in entries]}))

    def model(self, entry: Mapping[str, Any]) -> Answer:
        return Answer(200, orjson.dumps(_model_entry(entry)))

    async def local(self, route: Route, incoming: Incoming, catalog: Catalog) -> Answer:
        """countTokens: the model's server counts where it can, else an estimate."""
        model = incoming.params.get("name", "").removeprefix("models/")
        body = json_object(incoming.body)
        inner = _dict(body.get("generateContentRequest")) or body
        chat = catalog.seen(to_chat({**inner, "contents": inner.get("contents") or []}, model))
        counted = None
        try:
            resolved = catalog.resolve(model)
        except ModelNotFound:
            resolved = None
        if resolved is not None:
            counted = await catalog.count_tokens(resolved, chat)
        estimate = estimate_tokens(prompt_text(chat))
        return Answer(200, orjson.dumps({"totalTokens": counted or estimate}))


def _route(method: str, path: str, kind: str, target: str = "", header: str | None = None) -> Route:
    """A Gemini route: its key may come as `?key=` too."""
    return Route(method, path, kind, target, header=header, key_param="key")


def _model_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": f"models/{entry['id']}",
        "displayName": entry["id"],
        "supportedGenerationMethods": ["generateContent", "countTokens"],
    }
    for ours, theirs in (
        ("context_length", "inputTokenLimit"),
        ("max_output_tokens", "outputTokenLimit"),
    ):
        if isinstance(entry.get(ours), int):
            out[theirs] = entry[ours]
    return out


# --- request -----------------------------------------------------------------------------


def to_chat(body: dict[str, Any], model: str) -> dict[str, Any]:
    """A generateContent body as a chat-completions body; a field of a wrong shape is a
    400 naming it."""
    contents = body.get("contents")
    if not isinstance(contents, list):
        raise InvalidRequest("contents: must be a list", param="contents")
    messages: list[dict[str, Any]] = []
    system = _texts(
        list_field(_dict(body.get("systemInstruction")), "parts", "systemInstruction.parts")
    )
    if system:
        messages.append({"role": "system", "content": system})
    waiting: list[tuple[str, str]] = []  # (name, id) of calls not answered yet, in order
    for i, content in enumerate(contents):
        if not isinstance(content, dict) or not isinstance(content.get("parts"), list):
            raise InvalidRequest(f"contents[{i}].parts: must be a list", param=f"contents[{i}]")
        role = content.get("role", "user")
        if role == "model":
            messages.extend(_model_turn(content["parts"], waiting))
        elif role in ("user", "function", "tool"):
            messages.extend(_user_turn(content["parts"], waiting))
        else:
            raise InvalidRequest(
                f"contents[{i}].role: must be user or model", param=f"contents[{i}].role"
            )
    chat: dict[str, Any] = {"model": model, "messages": messages}
    _tools(body, chat)
    _generation(_dict(body.get("generationConfig")), chat)
    return chat


def _texts(parts: list[Any]) -> str:
    return "\n".join(
        p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)
    )


def _model_turn(parts: list[Any], waiting: list[tuple[str, str]]) -> list[dict[str, Any]]:
    texts, calls = [], []
    for part in parts:
        if not isinstance(part, dict) or part.get("thought") is True:
            continue  # earlier thinking is not sent back
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part.get("functionCall"), dict):
            call = part["functionCall"]
            name = str(call.get("name") or "")
            call_id = str(call.get("id") or f"call_{secrets.token_hex(8)}")
            waiting.append((name, call_id))
            arguments = encode_client(_dict(call.get("args"))).decode()
            calls.append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            )
    if not texts and not calls:
        return []
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _user_turn(parts: list[Any], waiting: list[tuple[str, str]]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    content: list[dict[str, Any]] = []
    for part in parts:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            content.append({"type": "text", "text": part["text"]})
        elif isinstance(part.get("inlineData"), dict):
            data = part["inlineData"]
            mime = data.get("mimeType", "application/octet-stream")
            url = f"data:{mime};base64,{data.get('data', '')}"
            content.append({"type": "image_url", "image_url": {"url": url}})
        elif isinstance(part.get("functionResponse"), dict):
            response = part["functionResponse"]
            name = str(response.get("name") or "")
            # The first call of that name not answered yet (by its id when it has one).
            at = next(
                (i for i, (n, c) in enumerate(waiting) if c == response.get("id")),
                next((i for i, (n, _) in enumerate(waiting) if n == name), None),
            )
            call_id = waiting.pop(at)[1] if at is not None else f"call_{secrets.token_hex(8)}"
            result = response.get("response")
            text = encode_client(result).decode() if not isinstance(result, str) else result
            results.append({"role": "tool", "tool_call_id": call_id, "content": text})
    out = results
    if content:
        text_only = all(c["type"] == "text" for c in content)
        out.append(
            {
                "role": "user",
                "content": "\n".join(c["text"] for c in content) if text_only else content,
            }
        )
    return out


def _tools(body: dict[str, Any], chat: dict[str, Any]) -> None:
    tools: list[dict[str, Any]] = []
    for i, tool in enumerate(list_field(body, "tools")):
        where = f"tools[{i}].functionDeclarations"
        for declaration in list_field(_dict(tool), "functionDeclarations", where):
            if not isinstance(declaration, dict) or not isinstance(declaration.get("name"), str):
                continue
            # google-genai 3.6 sends `parameters_json_schema` as it is, in snake case.
            schema = (
                declaration.get("parametersJsonSchema")
                or declaration.get("parameters_json_schema")
                or declaration.get("parameters")
            )
            function: dict[str, Any] = {"name": declaration["name"], "parameters": _schema(schema)}
            if isinstance(declaration.get("description"), str):
                function["description"] = declaration["description"]
            tools.append({"type": "function", "function": function})
    config = _dict(_dict(body.get("toolConfig")).get("functionCallingConfig"))
    mode = config.get("mode")
    names = list_field(config, "allowedFunctionNames", "toolConfig.functionCallingConfig")
    allowed = [n for n in names if isinstance(n, str)]
    if allowed:
        tools = [t for t in tools if t["function"]["name"] in allowed]
    if not tools:
        return
    chat["tools"] = tools
    if mode == "NONE":
        chat["tool_choice"] = "none"
    elif mode == "ANY" and len(allowed) == 1:
        chat["tool_choice"] = {"type": "function", "function": {"name": allowed[0]}}
    elif mode == "ANY":
        chat["tool_choice"] = "required"
    elif mode == "AUTO":
        chat["tool_choice"] = "auto"


def _schema(schema: Any) -> dict[str, Any]:
    """Gemini's OpenAPI-style schema (types in capitals) as JSON Schema."""
    if not isinstance(schema, dict):
        return {"type": "object", "properties": {}}
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, str):
            out[key] = value.lower()
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: _schema(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = _schema(value)
        else:
            out[key] = value
    return out


def _generation(config: dict[str, Any], chat: dict[str, Any]) -> None:
    count = config.get("candidateCount")
    if count not in (None, 1):
        raise InvalidRequest(
            "generationConfig.candidateCount: only 1 is supported",
            param="generationConfig.candidateCount",
        )
    for theirs, ours in (
        ("temperature", "temperature"),
        ("topP", "top_p"),
        ("topK", "top_k"),
        ("maxOutputTokens", "max_tokens"),
    ):
        value = config.get(theirs)
        if isinstance(value, int | float) and not isinstance(value, bool):
            chat[ours] = value
    stops = config.get("stopSequences")
    if isinstance(stops, list) and stops:
        chat["stop"] = [s for s in stops if isinstance(s, str)]
    if config.get("responseMimeType") == "application/json":
        schema = config.get("responseJsonSchema") or config.get("responseSchema")
        if isinstance(schema, dict):
            chat["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": _schema(schema)},
            }
        else:
            chat["response_format"] = {"type": "json_object"}
    thinking = _dict(config.get("thinkingConfig"))
    budget = _field(thinking, "thinkingBudget")
    if isinstance(budget, int) and budget > 0:
        chat["reasoning_effort"] = (
            "low" if budget < 4096 else "medium" if budget < 16384 else "high"
        )


# --- answer ------------------------------------------------------------------------------


def _usage(record: RequestRecord) -> dict[str, int]:
    prompt, completion = record.prompt_tokens or 0, record.completion_tokens or 0
    return {
        "promptTokenCount": prompt,
        "candidatesTokenCount": completion,
        "totalTokenCount": prompt + completion,
    }


def _response(
    parts: list[dict[str, Any]], record: RequestRecord, response_id: str, **more: Any
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    candidate |= {k: v for k, v in more.items() if k == "finishReason"}
    document: dict[str, Any] = {"candidates": [candidate]}
    if "usageMetadata" in more:
        document["usageMetadata"] = more["usageMetadata"]
    document["modelVersion"] = record.model or ""
    document["responseId"] = response_id
    return document


class GeminiTranslation:
    early = False  # no keepalive: a stream opens with the model's first chunk
    relays_as_is = False
    thinking = True  # thought parts, marked `thought`, when the request includeThoughts

    def __init__(
        self,
        target: str,
        payload: JsonPayload,
        model: str,
        stream: bool,
        sse: bool,
        batch: bool = False,  # batchEmbedContents: several texts, several embeddings
    ) -> None:
        self.batch = batch
        self.target = target
        self.payload = payload
        self.model = model
        self.stream = stream
        self.sse = sse

    def answer(self, reply: Reply, record: RequestRecord) -> Answer:
        if record.answered_in == "gemini":
            body = _renamed(reply.body, reply.model_id, record)

            def read_usage() -> dict[str, Any]:
                metadata = _dict(_dict(json_document(body)).get("usageMetadata"))
                return {"usage": from_gemini(metadata)}

            record.read_usage = read_usage
            return Answer(reply.status, body, headers=kept_headers(reply))
        document = _dict(json_document(reply.body))
        record.take_usage(document)
        if self.target == "embeddings":
            vectors = [
                {"values": _dict(item).get("embedding") or []}
                for item in document.get("data") or ()
            ]
            if self.batch:
                return Answer(200, orjson.dumps({"embeddings": vectors}))
            return Answer(200, orjson.dumps({"embedding": (vectors or [{"values": []}])[0]}))
        choice = _dict((document.get("choices") or [{}])[0])
        message = _dict(choice.get("message"))
        parts: list[dict[str, Any]] = []
        if thought := reasoning_text(message):
            parts.append({"text": thought, "thought": True})
        if isinstance(message.get("content"), str) and message["content"]:
            parts.append({"text": message["content"]})
        for call in message.get("tool_calls") or ():
            function = _dict(_dict(call).get("function"))
            parts.append(
                {
                    "functionCall": {
                        "name": function.get("name") or "",
                        "args": arguments_object(function.get("arguments")),
                    }
                }
            )
        reason = _FINISH_REASONS.get(str(choice.get("finish_reason")), "STOP")
        answer = _response(
            parts, record, _response_id(), finishReason=reason, usageMetadata=_usage(record)
        )
        return Answer(200, orjson.dumps(answer))

    def upstream_error(self, reply: Reply) -> Answer:
        failed = UpstreamFailed(reply.status, reply.body)
        return Answer(
            reply.status, error_body(reply.status, failed.message), headers=kept_headers(reply)
        )

    def stream_transform(self, record: RequestRecord, reply: Reply | None) -> GeminiStream:
        return GeminiStream(record, self.sse, reply.model_id if reply is not None else "")


def _renamed(data: bytes, model_id: str, record: RequestRecord) -> bytes:
    """A Gemini back-end's bytes with the name the client asked for as `modelVersion`
    where the back-end wrote the model's own id."""
    name = record.model or ""
    if not model_id or model_id == name:
        return data
    old, new = orjson.dumps(model_id), orjson.dumps(name)
    for gap in (b"", b" "):
        data = data.replace(b'"modelVersion":' + gap + old, b'"modelVersion":' + gap + new)
    return data


def _response_id() -> str:
    return secrets.token_urlsafe(12)


# --- stream ------------------------------------------------------------------------------


class GeminiStream(ChoiceStream):
    """OpenAI chunks → GenerateContentResponses, one per chunk with something to say:
    SSE frames (`alt=sse`, no [DONE]) or the elements of one JSON array. States: not
    started; streaming (tool calls gathered, sent whole at the end); ended or failed
    (an error response sent): nothing follows."""

    def __init__(self, record: RequestRecord, sse: bool, model_id: str = "") -> None:
        self.record = record
        self.model_id = model_id
        self.passed: EventSplitter | None = None  # a Gemini back-end's own frames
        self.sse = sse
        self.media_type = "text/event-stream" if sse else "application/json"
        self.choices = ChoiceReader(record)
        self.started = False
        self.done = False
        self.frames = 0
        self.id = _response_id()
        self.calls = ToolCalls()
        self.finish_reason: Any = None
        # A response that only adds text, cut around its text once: most chunks are that.
        head, _, tail = orjson.dumps(_response([{"text": ""}], record, self.id)).partition(b'""')
        self.text_head, self.text_tail = head, tail

    def feed(self, chunk: bytes) -> bytes:
        if self.record.answered_in == "gemini":
            return self._pass_on(chunk)
        return super().feed(chunk)

    def finish(self) -> bytes:
        if self.record.answered_in == "gemini" and not self.done:
            self.done = True
            return self._pass_on(b"", last=True) + (b"" if self.sse else b"]")
        return super().finish()

    def _pass_on(self, chunk: bytes, last: bool = False) -> bytes:
        """A Gemini back-end's SSE frames as they came (the model renamed): as they are to
        an SSE client, as array elements to another; the usage read from each."""
        if self.passed is None:
            self.passed = EventSplitter()
        complete = self.passed.feed(chunk) if chunk else b""
        if last and (rest := self.passed.rest()).strip():
            complete += rest + b"\r\n\r\n"
        if not complete:
            return b""
        complete = _renamed(complete, self.model_id, self.record)
        events = [e for e in EVENT_END.split(complete) if e.strip()]
        for event in events:
            if event.find(b'"usageMetadata"') >= 0:
                metadata = _dict(_dict(json_document(event_data(event))).get("usageMetadata"))
                self.record.take_usage({"usage": from_gemini(metadata)})
        if self.sse:
            self.started = True
            return complete
        out = self.start()
        for event in events:
            out += self._raw_frame(event_data(event))
        return out

    def _raw_frame(self, data: bytes) -> bytes:
        self.frames += 1
        if self.sse:
            return b"data: " + data + b"\r\n\r\n"
        return (b"" if self.frames == 1 else b",\r\n") + data

    def _frame(self, document: dict[str, Any]) -> bytes:
        return self._raw_frame(orjson.dumps(document))

    def start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return b"" if self.sse else b"["

    def keepalive(self) -> bytes:
        return b""

    def _choice(self, choice: dict[str, Any]) -> bytes:
        if (text := added_text(choice)) is not None:
            return self._raw_frame(self.text_head + orjson.dumps(text) + self.text_tail)
        delta = _dict(choice.get("delta"))
        parts: list[dict[str, Any]] = []
        if thought := reasoning_text(delta):
            parts.append({"text": thought, "thought": True})
        if isinstance(delta.get("content"), str) and delta["content"]:
            parts.append({"text": delta["content"]})
        if "tool_calls" in delta:
            self.calls.add(delta)
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        return self._frame(_response(parts, self.record, self.id)) if parts else b""

    def _end(self) -> bytes:
        parts = [
            {"functionCall": {"name": call.name, "args": arguments_object(call.arguments)}}
            for call in self.calls.in_order()
        ]
        reason = _FINISH_REASONS.get(str(self.finish_reason), "STOP")
        last = _response(
            parts, self.record, self.id, finishReason=reason, usageMetadata=_usage(self.record)
        )
        return self._frame(last) + (b"" if self.sse else b"]")

    def _error(self, error: ProxyError) -> bytes:
        body = {
            "error": {
                "code": error.status,
                "message": error.message,
                "status": status_name(error.status),
            }
        }
        return self._frame(body) + (b"" if self.sse else b"]")
