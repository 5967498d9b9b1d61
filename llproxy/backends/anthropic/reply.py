"""An Anthropic Messages answer, stream or error as the internal OpenAI chat answer.

A stream is translated event by event as it arrives: text and thinking deltas become
content and reasoning deltas, a tool_use block becomes a tool call whose arguments come in
the fragments Anthropic sends, `message_delta` becomes the finish chunk and the usage
chunk, `message_stop` the `[DONE]`. Usage counts the prompt as OpenAI does, cached tokens
included (core.usage.from_anthropic).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from ...core.sse import json_document
from ...core.usage import from_anthropic
from ..translated import EventChunks, object_of

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_DONE = b"data: [DONE]\n\n"


def _finish(stop_reason: Any, stop_sequence: Any) -> dict[str, Any]:
    finish: dict[str, Any] = {"finish_reason": FINISH_REASONS.get(stop_reason, "stop")}
    if stop_reason == "stop_sequence" and isinstance(stop_sequence, str):
        finish["stop_reason"] = stop_sequence  # as vLLM names the stop string that matched
    return finish


def chat_answer(raw: bytes) -> bytes:
    """A whole Messages answer as a chat.completion."""
    message = json_document(raw)
    if not isinstance(message, dict):
        message = {}
    texts, thoughts, calls = [], [], []
    for block in message.get("content") or ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thoughts.append(block["thinking"])
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            function = {"name": str(block.get("name") or ""), "arguments": arguments}
            calls.append(
                {"id": str(block.get("id") or ""), "type": "function", "function": function}
            )
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if thoughts:
        reply["reasoning_content"] = "".join(thoughts)
    if calls:
        reply["tool_calls"] = calls
    choice = {"index": 0, "message": reply}
    choice |= _finish(message.get("stop_reason"), message.get("stop_sequence"))
    native = message.get("usage")
    answer = {
        "id": str(message.get("id") or ""),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(message.get("model") or ""),
        "choices": [choice],
        "usage": from_anthropic(native if isinstance(native, dict) else {}),
    }
    return orjson.dumps(answer)


def chat_error(status: int, raw: bytes) -> bytes:
    """An Anthropic error body as an OpenAI one: its message, its type kept."""
    document = json_document(raw)
    error = document.get("error") if isinstance(document, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        message = raw[:1000].decode("utf-8", "replace").strip() or f"upstream status {status}"
    kind = error.get("type") if isinstance(error, dict) else None
    return orjson.dumps(
        {"error": {"message": message, "type": kind or "upstream_error", "code": str(status)}}
    )


class ChatChunks(EventChunks):
    """Anthropic's stream events → OpenAI chat chunks. States: before message_start;
    streaming (a block open or not; tool_use blocks are numbered as tool calls); ended
    (message_stop or an error event): nothing follows."""

    def __init__(self) -> None:
        super().__init__()
        self.native_usage: dict[str, Any] = {}
        self.calls = 0  # tool_use blocks so far
        self.call_of: dict[int, int] = {}  # block index → tool call index

    def event(self, event: dict[str, Any]) -> bytes:
        kind = event.get("type")
        if kind == "content_block_delta":
            return self._delta(event)
        if kind == "message_start":
            message = event.get("message")
            message = object_of(message)
            self.id = str(message.get("id") or "")
            self.model = str(message.get("model") or "")
            if isinstance(message.get("usage"), dict):
                self.native_usage.update(message["usage"])
            return self.chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            return self._block_start(event)
        if kind == "message_delta":
            # Its usage is cumulative: it replaces what message_start said.
            if isinstance(event.get("usage"), dict):
                self.native_usage.update({k: v for k, v in event["usage"].items() if v is not None})
            delta = object_of(event.get("delta"))
            finish = _finish(delta.get("stop_reason"), delta.get("stop_sequence"))
            return self.chunk({}, **finish) + self.data(
                {"choices": [], "usage": from_anthropic(self.native_usage)}
            )
        if kind == "message_stop":
            self.ended = True
            return _DONE
        if kind == "error":
            self.ended = True
            error = object_of(event.get("error"))
            body = {
                "message": str(error.get("message") or "the upstream failed"),
                "type": str(error.get("type") or "api_error"),
                "code": None,
            }
            return b"data: " + orjson.dumps({"error": body}) + b"\n\n"
        return b""  # ping, and events added after this was written

    def _block_start(self, event: dict[str, Any]) -> bytes:
        block = event.get("content_block")
        block = object_of(block)
        kind = block.get("type")
        if kind == "tool_use":
            index = self.calls
            self.calls += 1
            self.call_of[_index(event)] = index
            call = {
                "index": index,
                "id": str(block.get("id") or ""),
                "type": "function",
                "function": {"name": str(block.get("name") or ""), "arguments": ""},
            }
            return self.chunk({"tool_calls": [call]})
        if kind == "text" and isinstance(block.get("text"), str) and block["text"]:
            return self.chunk({"content": block["text"]})
        if kind == "thinking" and isinstance(block.get("thinking"), str) and block["thinking"]:
            return self.chunk({"reasoning_content": block["thinking"]})
        return b""

    def _delta(self, event: dict[str, Any]) -> bytes:
        delta = event.get("delta")
        delta = object_of(delta)
        kind = delta.get("type")
        if kind == "text_delta" and isinstance(delta.get("text"), str):
            return self.chunk({"content": delta["text"]})
        if kind == "thinking_delta" and isinstance(delta.get("thinking"), str):
            return self.chunk({"reasoning_content": delta["thinking"]})
        if kind == "input_json_delta" and isinstance(delta.get("partial_json"), str):
            call = self.call_of.get(_index(event))
            if call is None or not delta["partial_json"]:
                return b""
            fragment = {"index": call, "function": {"arguments": delta["partial_json"]}}
            return self.chunk({"tool_calls": [fragment]})
        return b""  # signatures, citations


def _index(event: dict[str, Any]) -> int:
    index = event.get("index")
    return index if isinstance(index, int) else -1
