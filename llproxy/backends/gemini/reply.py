"""A Gemini answer, stream or error as the internal OpenAI chat answer.

Each streamed `GenerateContentResponse` (an SSE frame) becomes chunks as it arrives: text
parts become content deltas, parts marked `thought` reasoning deltas, each `functionCall`
part (which Gemini sends whole) a tool call with an id of llproxy's making. The frame
with a `finishReason` gives the finish chunk, and the last usage the usage chunk (as
core.usage.from_gemini counts it).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from ...core.sse import json_document
from ...core.usage import from_gemini
from ..translated import EventChunks, object_of

FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"}
_FILTERED = {
    "SAFETY",
    "RECITATION",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT",
    "IMAGE_RECITATION",
}
_DONE = b"data: [DONE]\n\n"


def _finish(reason: Any, called: bool) -> str:
    if reason in _FILTERED:
        return "content_filter"
    if called:
        return "tool_calls"
    return FINISH_REASONS.get(reason, "stop")


# A function call's thoughtSignature rides in its tool call id, after this mark (not a
# base64 character), so the call comes back with it in the history (Gemini 3 asks that).
SIGNATURE_MARK = "~"


def _call_id(part: dict[str, Any] | None = None) -> str:
    made = "call_" + secrets.token_hex(8)
    signature = part.get("thoughtSignature") if part is not None else None
    return (
        f"{made}{SIGNATURE_MARK}{signature}" if isinstance(signature, str) and signature else made
    )


def _parts(document: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    """The first candidate's parts and finish reason."""
    candidates = document.get("candidates")
    candidate = object_of(candidates[0] if isinstance(candidates, list) and candidates else None)
    parts = object_of(candidate.get("content")).get("parts")
    return [p for p in parts if isinstance(p, dict)] if isinstance(
        parts, list
    ) else [], candidate.get("finishReason")


def _function(part: dict[str, Any]) -> dict[str, Any] | None:
    call = part.get("functionCall")
    if not isinstance(call, dict):
        return None
    arguments = orjson.dumps(object_of(call.get("args"))).decode()
    return {"name": str(call.get("name") or ""), "arguments": arguments}


def chat_answer(raw: bytes, model: str) -> bytes:
    document = object_of(json_document(raw))
    parts, reason = _parts(document)
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in parts:
        if (function := _function(part)) is not None:
            calls.append({"id": _call_id(part), "type": "function", "function": function})
        elif isinstance(part.get("text"), str):
            (thoughts if part.get("thought") is True else texts).append(part["text"])
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if thoughts:
        message["reasoning_content"] = "".join(thoughts)
    if calls:
        message["tool_calls"] = calls
    answer = {
        "id": str(document.get("responseId") or _call_id()),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(document.get("modelVersion") or model),
        "choices": [
            {"index": 0, "message": message, "finish_reason": _finish(reason, bool(calls))}
        ],
        "usage": from_gemini(object_of(document.get("usageMetadata"))),
    }
    return orjson.dumps(answer)


def chat_error(status: int, raw: bytes) -> bytes:
    """Google's error body as an OpenAI one: its message, its status name as the type."""
    error = object_of(object_of(json_document(raw)).get("error"))
    message = error.get("message")
    if not isinstance(message, str):
        message = raw[:1000].decode("utf-8", "replace").strip() or f"upstream status {status}"
    kind = error.get("status") if isinstance(error.get("status"), str) else "upstream_error"
    return orjson.dumps({"error": {"message": message, "type": kind, "code": str(status)}})


class ChatChunks(EventChunks):
    """Gemini's SSE frames → OpenAI chat chunks. States: before the first frame (which
    adds the role); streaming; finished (a finishReason came: the finish and usage chunks
    are sent at the stream's end, after any frame that only brings usage); ended."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.id = _call_id()
        self.started = False
        self.calls = 0
        self.reason: Any = None
        self.usage: dict[str, Any] = {}

    def finish(self) -> bytes:
        """The end of the upstream's stream: its last frame, the finish, the usage."""
        out = self.feed_rest()
        if self.ended:
            return out
        self.ended = True
        reason = _finish(self.reason, self.calls > 0)
        usage = {"choices": [], "usage": from_gemini(self.usage)}
        return out + self.chunk({}, finish_reason=reason) + self.data(usage) + _DONE

    def event(self, document: dict[str, Any]) -> bytes:
        if isinstance(document.get("error"), dict):
            self.ended = True
            error = document["error"]
            body = {
                "message": str(error.get("message") or "the upstream failed"),
                "type": str(error.get("status") or "upstream_error"),
                "code": None,
            }
            return b"data: " + orjson.dumps({"error": body}) + b"\n\n"
        out = []
        if not self.started:
            self.started = True
            if isinstance(document.get("responseId"), str):
                self.id = document["responseId"]
            out.append(self.chunk({"role": "assistant", "content": ""}))
        if isinstance(document.get("usageMetadata"), dict):
            self.usage = document["usageMetadata"]  # each frame's is the total so far
        parts, reason = _parts(document)
        for part in parts:
            if (function := _function(part)) is not None:
                call = {
                    "index": self.calls,
                    "id": _call_id(part),
                    "type": "function",
                    "function": function,
                }
                self.calls += 1
                out.append(self.chunk({"tool_calls": [call]}))
            elif isinstance(part.get("text"), str) and part["text"]:
                member = "reasoning_content" if part.get("thought") is True else "content"
                out.append(self.chunk({member: part["text"]}))
        if reason:
            self.reason = reason
        return b"".join(out)
