"""The OpenAI Responses dialect (`POST /v1/responses`, stateless) over chat-completions
models.

Input items become chat messages (function calls and their outputs included), flat
function tools become nested ones; the answer becomes a response object whose output
items are reasoning, message and function_call. A stream emits every event of the
protocol in order, numbered, each item added before its deltas; tool calls, gathered
from their fragments, are emitted whole once the model has finished them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..core.call import JsonPayload, Reply, encode_client, json_object
from ..core.errors import InvalidRequest, ProxyError, UpstreamFailed
from ..core.record import RequestRecord
from ..core.sse import ChoiceReader, ToolCalls
from . import Answer, Catalog, ChoiceStream, Incoming, Route, added_text, kept_headers, list_field
from .openai import OpenAIDialect, error_of

# Input fields that need state or tools llproxy does not have: a 400 that names them.
_UNSUPPORTED = {
    "previous_response_id": "llproxy keeps no responses: send the whole conversation in input",
    "conversation": "llproxy keeps no conversations: send the whole conversation in input",
}
# Echoed in every response object as the request gave them.
_ECHOED = ("instructions", "tool_choice", "temperature", "top_p", "max_output_tokens", "metadata")


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _arguments(arguments: Any) -> str:
    """A tool call's arguments as the JSON text Responses carries (some servers send an
    object)."""
    if isinstance(arguments, dict):
        return orjson.dumps(arguments).decode()
    return arguments if isinstance(arguments, str) and arguments else "{}"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class ResponsesDialect:
    name = "responses"
    routes = (Route("POST", "/v1/responses", "call", "chat/completions"),)

    def translate(self, route: Route, incoming: Incoming) -> ResponsesTranslation:
        body = json_object(incoming.body)
        chat = to_chat(body)
        stream = body.get("stream") is True
        if stream:
            chat["stream"] = True
            chat["stream_options"] = {"include_usage": True}
        echo = {name: body.get(name) for name in _ECHOED}
        echo["tools"] = body.get("tools") or []
        echo["parallel_tool_calls"] = body.get("parallel_tool_calls", True)
        echo["text"] = body.get("text") or {"format": {"type": "text"}}
        echo["metadata"] = echo["metadata"] or {}
        echo["tool_choice"] = echo["tool_choice"] or "auto"
        # The answer repeats these as the client sent them, a stream's events one level
        # deeper (`{"response": {...}}`): what could not be written there is refused now
        # (about 6 µs for Codex's 17 kB of tools and instructions, measured).
        encode_client([echo])
        return ResponsesTranslation(JsonPayload(chat), chat["model"], stream, echo)

    def error(self, error: ProxyError) -> Answer:
        return OpenAIDialect.error(OpenAIDialect(), error)

    def models(self, entries: Sequence[Mapping[str, Any]]) -> Answer:
        raise NotImplementedError  # it declares no listing route

    def model(self, entry: Mapping[str, Any]) -> Answer:
        raise NotImplementedError

    async def local(self, route: Route, incoming: Incoming, catalog: Catalog) -> Answer:
        raise NotImplementedError


# --- request -----------------------------------------------------------------------------


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses body as a chat-completions body; what needs state or hosted tools is a
    400 naming the field."""
    for name, why in _UNSUPPORTED.items():
        if body.get(name) is not None:
            raise InvalidRequest(f"{name} is not supported: {why}", param=name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string", param="model")
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise InvalidRequest(f"input[{i}] must be an object", param=f"input[{i}]")
            _item(i, item, messages)
    else:
        raise InvalidRequest("'input' must be a string or a list of items", param="input")
    chat: dict[str, Any] = {"model": model, "messages": messages}
    tools = [_tool(i, tool) for i, tool in enumerate(list_field(body, "tools"))]
    if tools:
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise InvalidRequest(
                "tool_choice: only function tools are supported", param="tool_choice"
            )
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    if isinstance(body.get("max_output_tokens"), int):
        chat["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "parallel_tool_calls"):
        if body.get(name) is not None:
            chat[name] = body[name]
    effort = _dict(body.get("reasoning")).get("effort")
    if isinstance(effort, str):
        chat["reasoning_effort"] = effort
    text_format = _dict(_dict(body.get("text")).get("format"))
    if text_format.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif text_format.get("type") == "json_schema":
        schema = {
            "name": text_format.get("name") or "response",
            "schema": text_format.get("schema") or {},
            "strict": text_format.get("strict", False),
        }
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    return chat


def _content(where: str, content: Any) -> str | list[dict[str, Any]]:
    """An item's content as chat content: text parts joined to a string when they are all
    text, else parts; files are a 400 (no upstream here reads them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(
            f"{where}.content must be a string or a list", param=f"{where}.content"
        )
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = _dict(part).get("type")
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise InvalidRequest(
                    f"{where}.content[{j}].image_url: a URL or data URL is needed (no file_id)",
                    param=f"{where}.content[{j}].image_url",
                )
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise InvalidRequest(
                f"{where}.content[{j}]: {kind!r} parts are not supported",
                param=f"{where}.content[{j}]",
            )
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _last_assistant(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message a function call or reasoning item belongs to: the last one
    when the conversation ends with it, else a new one."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[-1]
    messages.append({"role": "assistant", "content": None})
    return messages[-1]


def _item(i: int, item: dict[str, Any], messages: list[dict[str, Any]]) -> None:
    where = f"input[{i}]"
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise InvalidRequest(
                f"{where}.role must be user, system, developer or assistant", param=f"{where}.role"
            )
        content = _content(where, item.get("content"))
        if role == "assistant":
            message = _last_assistant(messages)
            text = content if isinstance(content, str) else ""
            message["content"] = (message["content"] or "") + text
        else:
            # Local chat templates know system, not developer.
            messages.append({"role": "system" if role == "developer" else role, "content": content})
    elif kind == "function_call":
        message = _last_assistant(messages)
        message.setdefault("tool_calls", []).append(
            {
                "id": str(item.get("call_id") or _id("call")),
                "type": "function",
                "function": {
                    "name": str(item.get("name") or ""),
                    "arguments": str(item.get("arguments") or "{}"),
                },
            }
        )
    elif kind == "function_call_output":
        output = item.get("output")
        result = output if isinstance(output, str) else _content(where, output)
        messages.append(
            {"role": "tool", "tool_call_id": str(item.get("call_id") or ""), "content": result}
        )
    elif kind == "reasoning":
        parts = list_field(item, "content", f"{where}.content") or list_field(
            item, "summary", f"{where}.summary"
        )
        texts = [_dict(part).get("text") for part in parts]
        thought = "".join(text for text in texts if isinstance(text, str))
        if thought:
            _last_assistant(messages)["reasoning_content"] = thought
    else:
        raise InvalidRequest(
            f"{where}.type: {kind!r} items are not supported", param=f"{where}.type"
        )


def _tool(i: int, tool: Any) -> dict[str, Any]:
    tool = _dict(tool)
    if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
        raise InvalidRequest(
            f"tools[{i}]: only function tools are supported, not {tool.get('type')!r}",
            param=f"tools[{i}].type",
        )
    function = {
        "name": tool["name"],
        "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
    }
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    if isinstance(tool.get("strict"), bool):
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


# --- answer ------------------------------------------------------------------------------


def _usage(record: RequestRecord) -> dict[str, Any]:
    prompt, completion = record.prompt_tokens or 0, record.completion_tokens or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": record.cached_tokens or 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [_text_part(text)] if status == "completed" else [],
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


_TEXT_DELTA = (
    b"event: response.output_text.delta\ndata: "
    b'{"type":"response.output_text.delta","sequence_number":%d,"item_id":"%b",'
    b'"output_index":%d,"content_index":0,"delta":%b,"logprobs":[]}\n\n'
)


class ResponsesTranslation:
    target = "chat/completions"
    early = True  # a comment keeps a client waiting on a long prefill
    relays_as_is = False
    thinking = True  # reasoning items, which clients may ignore

    def __init__(
        self, payload: JsonPayload, model: str, stream: bool, echo: dict[str, Any]
    ) -> None:
        self.payload = payload
        self.model = model
        self.stream = stream
        self.echo = echo
        self.id = _id("resp")
        self.created = int(time.time())

    def response(
        self, record: RequestRecord, status: str, output: list[dict[str, Any]], finish: Any
    ) -> dict[str, Any]:
        """The whole response object, as the answer and the stream's first and last events
        carry it."""
        incomplete = status == "completed" and finish == "length"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": "incomplete" if incomplete else status,
            "model": record.model,
            "output": output,
            "usage": _usage(record) if status != "in_progress" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "previous_response_id": None,
            "store": False,
            **self.echo,
        }

    def answer(self, reply: Reply, record: RequestRecord) -> Answer:
        document = _dict(reply.document)  # its shape checked by core.answer
        record.take_usage(document)
        choice = _dict((document.get("choices") or [{}])[0])
        message = _dict(choice.get("message"))
        output = []
        thought = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(thought, str) and thought:
            output.append(_reasoning_item(_id("rs"), thought))
        if isinstance(message.get("content"), str) and message["content"]:
            output.append(_message_item(_id("msg"), message["content"]))
        for call in message.get("tool_calls") or ():
            function = _dict(_dict(call).get("function"))
            output.append(
                _call_item(
                    _id("fc"),
                    str(call.get("id") or _id("call")),
                    str(function.get("name") or ""),
                    _arguments(function.get("arguments")),
                    "completed",
                )
            )
        body = self.response(record, "completed", output, choice.get("finish_reason"))
        return Answer(200, orjson.dumps(body))

    def upstream_error(self, reply: Reply) -> Answer:
        failed = UpstreamFailed(reply.status, reply.body)
        return Answer(reply.status, error_of(failed), headers=kept_headers(reply))

    def stream_transform(self, record: RequestRecord, reply: Reply | None) -> ResponsesStream:
        return ResponsesStream(self, record)


# --- stream ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Open:
    """The output item being streamed: a reasoning or a message item."""

    kind: str
    id: str
    index: int
    text: list[str] = field(default_factory=list)


class ResponsesStream(ChoiceStream):
    """OpenAI chunks → Responses events, each numbered. States: not started; an item open
    (reasoning or message) or none; ended (a terminal event sent): nothing follows."""

    media_type = "text/event-stream"

    def __init__(self, translation: ResponsesTranslation, record: RequestRecord) -> None:
        self.translation = translation
        self.record = record
        self.choices = ChoiceReader(record)
        self.sequence = 0
        self.started = False
        self.done = False
        self.output: list[dict[str, Any]] = []  # items done
        self.open: _Open | None = None
        self.calls = ToolCalls()
        self.finish_reason: Any = None

    def _event(self, name: str, data: dict[str, Any]) -> bytes:
        document = {"type": name, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(document) + b"\n\n"

    def start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        response = self.translation.response(self.record, "in_progress", [], None)
        return self._event("response.created", {"response": response}) + self._event(
            "response.in_progress", {"response": response}
        )

    def keepalive(self) -> bytes:
        return b": keepalive\n\n"

    def _choice(self, choice: dict[str, Any]) -> bytes:
        opened = self.open
        if opened is not None and opened.kind == "message" and (text := added_text(choice)):
            opened.text.append(text)
            self.sequence += 1
            return _TEXT_DELTA % (
                self.sequence - 1,
                opened.id.encode(),
                opened.index,
                orjson.dumps(text),
            )
        out = []
        delta = _dict(choice.get("delta"))
        thought = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(thought, str) and thought:
            out.append(self._into("reasoning", "response.reasoning_text.delta", thought))
        if isinstance(delta.get("content"), str) and delta["content"]:
            out.append(self._into("message", "response.output_text.delta", delta["content"]))
        if "tool_calls" in delta:
            self.calls.add(delta)
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        return b"".join(out)

    def _into(self, kind: str, event: str, text: str) -> bytes:
        """The text into an open item of its kind, adding one (and closing another)."""
        out = b""
        if self.open is None or self.open.kind != kind:
            out = self._close()
            self.open = _Open(kind, _id("rs" if kind == "reasoning" else "msg"), len(self.output))
            if kind == "reasoning":
                item: dict[str, Any] = {"type": "reasoning", "id": self.open.id, "summary": []}
            else:
                item = _message_item(self.open.id, "", "in_progress")
            out += self._event(
                "response.output_item.added", {"output_index": self.open.index, "item": item}
            )
            if kind == "message":
                out += self._event(
                    "response.content_part.added",
                    {**self._place(), "part": _text_part("")},
                )
        self.open.text.append(text)
        return out + self._event(
            event,
            {**self._place(), "delta": text} | ({"logprobs": []} if kind == "message" else {}),
        )

    def _place(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open.id, "output_index": self.open.index, "content_index": 0}

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        text = "".join(self.open.text)
        if self.open.kind == "reasoning":
            item = _reasoning_item(self.open.id, text)
            out = self._event("response.reasoning_text.done", {**self._place(), "text": text})
        else:
            item = _message_item(self.open.id, text)
            out = self._event(
                "response.output_text.done", {**self._place(), "text": text, "logprobs": []}
            )
            out += self._event(
                "response.content_part.done", {**self._place(), "part": _text_part(text)}
            )
        out += self._event(
            "response.output_item.done", {"output_index": self.open.index, "item": item}
        )
        self.output.append(item)
        self.open = None
        return out

    def _end(self) -> bytes:
        out = [self._close()]
        for call in self.calls.in_order():
            index = len(self.output)
            item_id, call_id = _id("fc"), call.id or _id("call")
            arguments = call.arguments or "{}"
            added = _call_item(item_id, call_id, call.name, "", "in_progress")
            item = _call_item(item_id, call_id, call.name, arguments, "completed")
            place = {"item_id": item_id, "output_index": index}
            out += [
                self._event("response.output_item.added", {"output_index": index, "item": added}),
                self._event(
                    "response.function_call_arguments.delta", {**place, "delta": arguments}
                ),
                self._event(
                    "response.function_call_arguments.done",
                    {**place, "name": call.name, "arguments": arguments},
                ),
                self._event("response.output_item.done", {"output_index": index, "item": item}),
            ]
            self.output.append(item)
        response = self.translation.response(
            self.record, "completed", self.output, self.finish_reason
        )
        # Also when the answer was cut short (status "incomplete"): the SDKs' stream helpers
        # take the final response only from response.completed.
        out.append(self._event("response.completed", {"response": response}))
        return b"".join(out)

    def _error(self, error: ProxyError) -> bytes:
        # A top-level `error` object: the SDKs raise it as an APIError.
        failure = {"code": error.code, "message": error.message, "param": error.param}
        return self._event("error", {**failure, "error": {"type": error.type, **failure}})
