"""The Ollama dialect (Open WebUI, VS Code Copilot's Ollama provider, Continue, the
`ollama` client) over OpenAI models.

`/api/chat`, `/api/generate` and the embedding routes become OpenAI calls; the answers
come back as Ollama objects, streamed as NDJSON by default, with a last object carrying
`done`, the reason and the counts and durations in nanoseconds. What Ollama answers
from its own model store (version, tags, show, ps) is answered from the registry;
managing models (pull, push, create, copy, delete, blobs) is not llproxy's: 501.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..core.call import JsonPayload, Reply, encode_client, json_object
from ..core.errors import InvalidRequest, ModelNotFound, ProxyError, UpstreamFailed
from ..core.record import RequestRecord
from ..core.registry import Model
from ..core.sse import ChoiceReader, ToolCalls, json_document
from . import Answer, Catalog, ChoiceStream, Incoming, Route, added_text, kept_headers, list_field

VERSION = "0.12.3"  # clients compare it: Copilot needs at least 0.6.4
NDJSON = "application/x-ndjson"
_MANAGEMENT = ("pull", "push", "create", "copy")
# Sampling options with the same name in OpenAI-compatible servers (llama.cpp and vLLM
# take top_k, min_p, typical_p; llama.cpp repeat_penalty). Server-side options (num_ctx,
# num_gpu, num_thread, …) are the server's to decide: not passed on.
_SAME_OPTIONS = (
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "top_k",
    "min_p",
    "typical_p",
    "repeat_penalty",
)
# Characters of an image checked as base64 (a multiple of 4).
_IMAGE_HEAD = 4096
_IMAGE_TYPES = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"RIFF", "image/webp"),
)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _now() -> str:
    """RFC 3339 with nanoseconds, as Ollama writes `created_at`."""
    now = time.time_ns()
    return f"{_second(now // 10**9)}.{now % 10**9:09d}Z"


@functools.lru_cache(maxsize=2)
def _second(seconds: int) -> str:
    # Every line of a stream carries the time: formatted once a second, not per line.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _error(status: int, message: str) -> Answer:
    return Answer(status, orjson.dumps({"error": message}))


class OllamaDialect:
    name = "ollama"

    def __init__(self) -> None:
        self.routes = (
            Route("GET", "/", "local", needs_key=False),
            Route("GET", "/api/version", "local", needs_key=False),
            Route("GET", "/api/tags", "local"),
            Route("POST", "/api/show", "local"),
            Route("GET", "/api/ps", "local"),
            Route("POST", "/api/chat", "call", "chat/completions"),
            Route("POST", "/api/generate", "call", "chat/completions"),
            Route("POST", "/api/embed", "call", "embeddings"),
            Route("POST", "/api/embeddings", "call", "embeddings"),
            *(Route("POST", f"/api/{name}", "local") for name in _MANAGEMENT),
            Route("DELETE", "/api/delete", "local"),
            Route("POST", "/api/blobs/{digest}", "local"),
            Route("HEAD", "/api/blobs/{digest}", "local"),
        )

    def translate(self, route: Route, incoming: Incoming) -> OllamaTranslation | Answer:
        body = json_object(incoming.body) if incoming.body else {}
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model is required", param="model")
        kind = route.path.removeprefix("/api/")
        if kind in ("embed", "embeddings"):
            field_name = "input" if kind == "embed" else "prompt"
            chat = {"model": model, "input": body.get(field_name, "")}
            if isinstance(body.get("dimensions"), int):
                chat["dimensions"] = body["dimensions"]
            return OllamaTranslation(kind, "embeddings", JsonPayload(chat), model, False, True)
        stream = body.get("stream") is not False  # Ollama streams unless told not to
        think = body.get("think")
        if kind == "chat":
            messages = body.get("messages")
            if not messages:
                return _load_or_unload(model, body, "chat")
            chat = {"model": model, "messages": _messages(messages)}
            if tools := list_field(body, "tools"):
                chat["tools"] = tools
            target = "chat/completions"
        else:
            prompt = body.get("prompt") or ""
            if not isinstance(prompt, str):
                raise InvalidRequest("prompt must be a string", param="prompt")
            if not prompt and not body.get("suffix"):
                return _load_or_unload(model, body, "generate")
            if body.get("raw") is True or body.get("suffix"):
                # Raw text and fill-in-the-middle go to the completions route.
                chat = {"model": model, "prompt": prompt}
                if isinstance(body.get("suffix"), str):
                    chat["suffix"] = body["suffix"]
                target = "completions"
            else:
                messages = []
                if isinstance(body.get("system"), str) and body["system"]:
                    messages.append({"role": "system", "content": body["system"]})
                messages.append(_user(prompt, body.get("images"), "images"))
                chat = {"model": model, "messages": messages}
                target = "chat/completions"
        _options(_dict(body.get("options")), chat)
        response_format = body.get("format")
        if response_format == "json":
            chat["response_format"] = {"type": "json_object"}
        elif isinstance(response_format, dict):
            schema = {"name": "response", "schema": response_format, "strict": True}
            chat["response_format"] = {"type": "json_schema", "json_schema": schema}
        if isinstance(think, str):
            chat["reasoning_effort"] = think
        if stream:
            chat["stream"] = True
            chat["stream_options"] = {"include_usage": True}
        return OllamaTranslation(kind, target, JsonPayload(chat), model, stream, think is not False)

    def error(self, error: ProxyError) -> Answer:
        if isinstance(error, ModelNotFound):
            return _error(404, f"model '{error.name}' not found")
        return Answer(error.status, orjson.dumps({"error": error.message}), headers=error.headers())

    def models(self, entries: Sequence[Mapping[str, Any]]) -> Answer:
        raise NotImplementedError  # its listings are local routes

    def model(self, entry: Mapping[str, Any]) -> Answer:
        raise NotImplementedError

    async def local(self, route: Route, incoming: Incoming, catalog: Catalog) -> Answer:
        path = route.path
        if path == "/":
            return Answer(200, b"Ollama is running", "text/plain")
        if path == "/api/version":
            return Answer(200, orjson.dumps({"version": VERSION}))
        if path == "/api/tags":
            models = [_tag(entry) for entry in catalog.listing()]
            return Answer(200, orjson.dumps({"models": models}))
        if path == "/api/ps":
            expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 300))
            running = []
            for entry in catalog.listing():
                context = catalog.resolve(entry["id"]).context_length
                running.append(
                    {**_tag(entry), "expires_at": expires, "size_vram": 0}
                    | ({"context_length": context} if context else {})
                )
            return Answer(200, orjson.dumps({"models": running}))
        if path == "/api/show":
            body = json_object(incoming.body)
            name = body.get("model") or body.get("name")  # older clients send `name`
            if not isinstance(name, str) or not name:
                raise InvalidRequest("model is required", param="model")
            return Answer(200, orjson.dumps(_show(name, catalog.resolve(name))))
        return _error(501, f"{path} is not supported: llproxy serves the models its servers have")


def _load_or_unload(model: str, body: dict[str, Any], kind: str) -> Answer:
    """An empty request loads a model, or with keep_alive 0 unloads it: the servers behind
    llproxy manage their own models, so it is answered at once."""
    reason = "unload" if body.get("keep_alive") in (0, "0", "0s", "0m") else "load"
    answer: dict[str, Any] = {
        "model": model,
        "created_at": _now(),
        "done": True,
        "done_reason": reason,
    }
    if kind == "chat":
        answer["message"] = {"role": "assistant", "content": ""}
    else:
        answer["response"] = ""
    return Answer(200, orjson.dumps(answer), about=model)


def _details(entry: Mapping[str, Any]) -> dict[str, Any]:
    details = _dict(entry.get("details"))
    family = details.get("family") or ""
    return {
        "parent_model": "",
        "format": details.get("format") or "gguf",
        "family": family,
        "families": details.get("families") or ([family] if family else []),
        "parameter_size": details.get("parameter_size") or "",
        "quantization_level": details.get("quantization_level") or "",
    }


def _tag(entry: Mapping[str, Any]) -> dict[str, Any]:
    name = entry["id"]
    created = entry.get("created")
    stamp = created if isinstance(created, int | float) and created > 0 else time.time()
    return {
        "name": name,
        "model": name,
        "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)),
        "size": 0,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": _details(entry),
    }


def _show(name: str, model: Model) -> dict[str, Any]:
    details = _details(model.entry)
    # Only a server that names the family says the architecture (Ollama does; llama.cpp's
    # listing and /props do not): no key rather than a made-up one.
    architecture = details["family"]
    info: dict[str, Any] = {"general.basename": name.split(":")[0]}
    if architecture:
        info["general.architecture"] = architecture
    parameters = ""
    if model.context_length:
        if architecture:
            info[f"{architecture}.context_length"] = model.context_length
        parameters = f"num_ctx {model.context_length}"
    return {
        "modelfile": "",
        "parameters": parameters,
        "template": "{{ .Prompt }}",
        "details": details,
        "model_info": info,
        "capabilities": ["completion", *model.capabilities],
        "modified_at": _tag({**model.entry, "id": name})["modified_at"],
    }


# --- request -----------------------------------------------------------------------------


def _data_url(image: Any, where: str) -> str:
    """An Ollama image (base64, no prefix) as a data URL, its type read from its bytes;
    anything else is a 400, as Ollama answers it. Only its start is decoded here (a whole
    10 MB image took 42 ms of the worker's loop, measured); the model's server decodes
    the rest, and refuses it if it is broken further on."""
    try:
        # isascii() is a flag of the string, not a scan; base64 comes in fours.
        if not isinstance(image, str) or not image.isascii() or len(image) % 4:
            raise ValueError
        head = base64.b64decode(image[:_IMAGE_HEAD], validate=True)[:8]
    except ValueError:  # binascii.Error too
        raise InvalidRequest(
            f"{where}: an image must be a base64 string (not a data: URL)", param=where
        ) from None
    media = next((media for magic, media in _IMAGE_TYPES if head.startswith(magic)), "image/png")
    return f"data:{media};base64,{image}"


def _user(content: str, images: Any, where: str) -> dict[str, Any]:
    if images is None or images == []:
        return {"role": "user", "content": content}
    if not isinstance(images, list):
        raise InvalidRequest(f"{where}: must be a list of base64 strings", param=where)
    parts: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
    parts += [
        {"type": "image_url", "image_url": {"url": _data_url(image, f"{where}[{j}]")}}
        for j, image in enumerate(images)
    ]
    return {"role": "user", "content": parts}


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise InvalidRequest("messages must be a list", param="messages")
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (tool name, id) of calls not answered yet
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string", param=f"messages[{i}]")
        if role == "user":
            out.append(_user(content, message.get("images"), f"messages[{i}].images"))
        elif role == "system":
            out.append({"role": "system", "content": content})
        elif role == "assistant":
            converted: dict[str, Any] = {"role": "assistant", "content": content or None}
            calls = []
            for call in list_field(message, "tool_calls", f"messages[{i}].tool_calls"):
                function = _dict(_dict(call).get("function"))
                # OpenAI servers need ids; Ollama's calls often have none.
                call_id = str(_dict(call).get("id") or f"call_{secrets.token_hex(6)}")
                pending.append((str(function.get("name") or ""), call_id))
                arguments = function.get("arguments")
                calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": str(function.get("name") or ""),
                            "arguments": arguments
                            if isinstance(arguments, str)
                            else encode_client(arguments or {}).decode(),
                        },
                    }
                )
            if calls:
                converted["tool_calls"] = calls
            if isinstance(message.get("thinking"), str) and message["thinking"]:
                converted["reasoning_content"] = message["thinking"]
            out.append(converted)
        elif role == "tool":
            given = message.get("tool_call_id")
            call_id = given if isinstance(given, str) else ""
            if not call_id:
                # Matched to the calls by the tool's name, else by order.
                name = message.get("tool_name")
                match = next((p for p in pending if p[0] == name), pending[0] if pending else None)
                call_id = match[1] if match else f"call_{secrets.token_hex(6)}"
                if match:
                    pending.remove(match)
            out.append({"role": "tool", "tool_call_id": call_id, "content": content})
        else:
            raise InvalidRequest(
                f"messages[{i}].role must be system, user, assistant or tool",
                param=f"messages[{i}].role",
            )
    return out


def _options(options: dict[str, Any], chat: dict[str, Any]) -> None:
    for name in _SAME_OPTIONS:
        if options.get(name) is not None:
            chat[name] = options[name]
    predict = options.get("num_predict")
    if isinstance(predict, int) and predict > 0:  # -1 and -2 mean "as much as fits"
        chat["max_tokens"] = predict


# --- answer ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Clock:
    """Wall-clock durations the final object reports, in nanoseconds, as Ollama does."""

    started: int = field(default_factory=time.perf_counter_ns)
    first: int | None = None

    def tick(self) -> None:
        if self.first is None:
            self.first = time.perf_counter_ns()

    def durations(self) -> dict[str, int]:
        now = time.perf_counter_ns()
        first = self.first or now
        return {
            "total_duration": now - self.started,
            "load_duration": 0,
            "prompt_eval_duration": first - self.started,
            "eval_duration": now - first,
        }


def _done(record: RequestRecord, clock: _Clock, reason: str) -> dict[str, Any]:
    return {
        "done": True,
        "done_reason": reason,
        **clock.durations(),
        "prompt_eval_count": record.prompt_tokens or 0,
        "eval_count": record.completion_tokens or 0,
    }


def _tool_calls(calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls as Ollama gives them: arguments an object, never a string."""
    out = []
    for index, call in enumerate(calls):
        function = _dict(call.get("function"))
        arguments = function.get("arguments")
        parsed = json_document(arguments.encode()) if isinstance(arguments, str) else arguments
        if not isinstance(parsed, dict):
            parsed = {"_raw": arguments} if arguments else {}
        out.append(
            {"function": {"index": index, "name": function.get("name") or "", "arguments": parsed}}
        )
    return out


_CHAT_LINE = (
    b'{"model":%b,"created_at":"%b","message":{"role":"assistant","content":%b},"done":false}\n'
)


class OllamaTranslation:
    early = False  # NDJSON has no keepalive: a stream opens with the model's first chunk
    relays_as_is = False

    def __init__(
        self, kind: str, target: str, payload: JsonPayload, model: str, stream: bool, think: bool
    ) -> None:
        self.kind = kind  # chat, generate, embed or embeddings
        self.target = target
        self.payload = payload
        self.model = model
        self.stream = stream
        self.think = think
        self.thinking = think  # `think: false` wants none
        self.clock = _Clock()

    def answer(self, reply: Reply, record: RequestRecord) -> Answer:
        document = _dict(reply.document)  # its shape checked by core.answer
        record.take_usage(document)
        if self.kind == "embed":
            vectors = [_dict(d).get("embedding") for d in document.get("data") or ()]
            body: dict[str, Any] = {
                "model": record.model,
                "embeddings": vectors,
                **{
                    k: v
                    for k, v in self.clock.durations().items()
                    if k in ("total_duration", "load_duration")
                },
                "prompt_eval_count": record.prompt_tokens or 0,
            }
            return Answer(200, orjson.dumps(body))
        if self.kind == "embeddings":
            first = _dict((document.get("data") or [{}])[0])
            return Answer(200, orjson.dumps({"embedding": first.get("embedding") or []}))
        choice = _dict((document.get("choices") or [{}])[0])
        message = _dict(choice.get("message"))
        text = message.get("content") if "message" in choice else choice.get("text")
        thinking = message.get("reasoning_content") or message.get("reasoning")
        body = {"model": record.model, "created_at": _now()}
        if self.kind == "chat":
            out: dict[str, Any] = {"role": "assistant", "content": text or ""}
            if thinking and self.think:
                out["thinking"] = thinking
            if message.get("tool_calls"):
                out["tool_calls"] = _tool_calls(message["tool_calls"])
            body["message"] = out
        else:
            body["response"] = text or ""
            if thinking and self.think:
                body["thinking"] = thinking
        reason = "length" if choice.get("finish_reason") == "length" else "stop"
        body |= _done(record, self.clock, reason)
        return Answer(200, orjson.dumps(body))

    def upstream_error(self, reply: Reply) -> Answer:
        answer = _error(reply.status, UpstreamFailed(reply.status, reply.body).message)
        return dataclasses.replace(answer, headers=kept_headers(reply))

    def stream_transform(self, record: RequestRecord, reply: Reply | None) -> OllamaStream:
        return OllamaStream(self, record)


class OllamaStream(ChoiceStream):
    """OpenAI chunks → NDJSON lines: text and thinking as they come, tool calls whole once
    the model finished them, then the final object with the counts; or an error line."""

    media_type = NDJSON

    def __init__(self, translation: OllamaTranslation, record: RequestRecord) -> None:
        self.translation = translation
        self.record = record
        self.choices = ChoiceReader(record)
        self.calls = ToolCalls()
        self.model = orjson.dumps(record.model)
        self.finish_reason: Any = None
        self.done = False

    def _line(self, **fields: Any) -> bytes:
        return orjson.dumps({"model": self.record.model, "created_at": _now(), **fields}) + b"\n"

    def _text(self, text: str, thinking: str = "") -> bytes:
        if self.translation.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            return self._line(message=message, done=False)
        return self._line(response=text, done=False, **({"thinking": thinking} if thinking else {}))

    def start(self) -> bytes:
        return b""

    def keepalive(self) -> bytes:
        return b""

    def _choice(self, choice: dict[str, Any]) -> bytes:
        if self.translation.kind == "chat" and (text := added_text(choice)) is not None:
            self.translation.clock.tick()
            return _CHAT_LINE % (self.model, _now().encode(), orjson.dumps(text))
        delta = _dict(choice.get("delta"))
        text = delta.get("content") if "delta" in choice else choice.get("text")
        thinking = delta.get("reasoning_content") or delta.get("reasoning")
        thinking = thinking if isinstance(thinking, str) and self.translation.think else ""
        if "tool_calls" in delta:
            self.calls.add(delta)
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        if (isinstance(text, str) and text) or thinking:
            self.translation.clock.tick()
            return self._text(text if isinstance(text, str) else "", thinking)
        return b""

    def _end(self) -> bytes:
        out = b""
        if self.calls and self.translation.kind == "chat":
            calls = [
                {"function": {"name": call.name, "arguments": call.arguments}}
                for call in self.calls.in_order()
            ]
            message = {"role": "assistant", "content": "", "tool_calls": _tool_calls(calls)}
            out += self._line(message=message, done=False)
        reason = "length" if self.finish_reason == "length" else "stop"
        last = _done(self.record, self.translation.clock, reason)
        if self.translation.kind == "chat":
            out += self._line(message={"role": "assistant", "content": ""}, **last)
        else:
            out += self._line(response="", **last)
        return out

    def _error(self, error: ProxyError) -> bytes:
        return orjson.dumps({"error": error.message}) + b"\n"
