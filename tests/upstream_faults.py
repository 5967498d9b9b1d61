"""The upstream-fault matrix's client side: one request per client dialect, over raw HTTP
(the wire is what is judged), and the rule every answer must keep.

The rule: a broken upstream answer is an error in the client's dialect, a 502 or 504
with its error shape, or a stream that ends with the dialect's error event; never a 200
with empty content, never a 500. An upstream answering in the other form, or a stream
with a chunk that is not JSON among good ones, still gives the whole text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from .fake_upstream import FAULT_TEXT

DIALECTS = ("openai", "anthropic", "responses", "ollama_chat", "ollama_generate")
TEXT = "".join(FAULT_TEXT)
MESSAGES = [{"role": "user", "content": "hi"}]


def succeeds(fault: str, stream: bool) -> bool:
    """Whether the client must get the whole text despite the fault."""
    return fault == "other_form" or (stream and fault in ("invalid_json", "nan"))


@dataclass
class Outcome:
    status: int
    content_type: str
    body: bytes


def request_for(dialect: str, model: str, stream: bool) -> tuple[str, dict[str, Any]]:
    if dialect == "openai":
        return "/v1/chat/completions", {"model": model, "messages": MESSAGES, "stream": stream}
    if dialect == "anthropic":
        body = {"model": model, "max_tokens": 64, "messages": MESSAGES, "stream": stream}
        return "/v1/messages", body
    if dialect == "responses":
        return "/v1/responses", {"model": model, "input": "hi", "stream": stream}
    if dialect == "ollama_chat":
        return "/api/chat", {"model": model, "messages": MESSAGES, "stream": stream}
    return "/api/generate", {"model": model, "prompt": "hi", "stream": stream}


async def ask(
    session: aiohttp.ClientSession, url: str, dialect: str, fault: str, stream: bool
) -> Outcome:
    path, body = request_for(dialect, f"fault-{fault}", stream)
    headers = {"anthropic-version": "2023-06-01"} if dialect == "anthropic" else {}
    async with session.post(url + path, json=body, headers=headers) as response:
        raw = await response.read()
        return Outcome(response.status, response.content_type, raw)


def _events(dialect: str, body: bytes) -> list[Any]:
    """The documents of a stream in the client's framing (SSE, or NDJSON for Ollama)."""
    if dialect.startswith("ollama"):
        return [json.loads(line) for line in body.splitlines() if line.strip()]
    documents = []
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = b"".join(
            line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")
        )
        if data and data != b"[DONE]":
            documents.append(json.loads(data))
    return documents


def _error_shaped(dialect: str, document: Any) -> bool:
    if not isinstance(document, dict):
        return False
    if dialect == "anthropic":
        error = document.get("error")
        return document.get("type") == "error" and isinstance(error, dict) and bool(error)
    if dialect.startswith("ollama"):
        return isinstance(document.get("error"), str) and bool(document["error"])
    error = document.get("error")
    return isinstance(error, dict) and isinstance(error.get("message"), str)


def _is_error_event(dialect: str, document: Any) -> bool:
    if dialect in ("anthropic", "responses"):
        return isinstance(document, dict) and document.get("type") == "error"
    return _error_shaped(dialect, document)


def _whole_text(dialect: str, document: Any) -> str:
    if dialect == "openai":
        return str(document["choices"][0]["message"]["content"] or "")
    if dialect == "anthropic":
        return "".join(b["text"] for b in document["content"] if b["type"] == "text")
    if dialect == "responses":
        return "".join(
            part["text"]
            for item in document["output"]
            if item["type"] == "message"
            for part in item["content"]
            if part["type"] == "output_text"
        )
    if dialect == "ollama_chat":
        return str(document["message"]["content"])
    return str(document["response"])


def _streamed_text(dialect: str, documents: list[Any]) -> str:
    pieces = []
    for document in documents:
        if dialect == "openai":
            for choice in document.get("choices") or ():
                pieces.append((choice.get("delta") or {}).get("content") or "")
        elif dialect == "anthropic":
            delta = document.get("delta") or {}
            if document.get("type") == "content_block_delta" and delta.get("type") == "text_delta":
                pieces.append(delta["text"])
        elif dialect == "responses":
            if document.get("type") == "response.output_text.delta":
                pieces.append(document["delta"])
        elif dialect == "ollama_chat":
            pieces.append((document.get("message") or {}).get("content") or "")
        else:
            pieces.append(document.get("response") or "")
    return "".join(pieces)


def judge(dialect: str, fault: str, stream: bool, outcome: Outcome) -> str | None:
    """What is wrong with the client's outcome; None when it keeps the rule."""
    status, body = outcome.status, outcome.body
    said = f"{status} {outcome.content_type} {body[:300]!r}"
    if status == 500:
        return f"a 500: {said}"
    if status != 200:
        if succeeds(fault, stream):
            return f"not the whole text: {said}"
        if status not in (502, 504):
            return f"status {status}, not 502/504: {said}"
        try:
            document = json.loads(body)
        except ValueError:
            return f"an error not in JSON: {said}"
        return None if _error_shaped(dialect, document) else f"not the dialect's shape: {said}"
    streamed = outcome.content_type in ("text/event-stream", "application/x-ndjson")
    if streamed != stream:
        return f"{'a stream' if streamed else 'a whole answer'} to the other form: {said}"
    try:
        documents = _events(dialect, body) if stream else [json.loads(body)]
    except ValueError:
        return f"a body the client cannot parse: {said}"
    if not documents:
        return f"an empty answer: {said}"
    if succeeds(fault, stream):
        if any(_is_error_event(dialect, d) for d in documents):
            return f"an error event where the text was whole: {said}"
        text = _streamed_text(dialect, documents) if stream else _whole_text(dialect, documents[0])
        return None if text == TEXT else f"text {text!r}, not {TEXT!r}: {said}"
    if not stream:
        return f"a 200 for a broken answer: {said}"
    if not _is_error_event(dialect, documents[-1]):
        return f"a stream not ended by the dialect's error event: {said}"
    return None
