"""Secrets kept out of prompts: before a call goes to a back-end marked `redact`, every
string of its body (messages, tool results, system prompt; the client's own request too,
when a cloud back-end passes that on) has the known secrets and the common key shapes
replaced by a placeholder. Only the number of replacements is kept, never what they were.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from .call import Call, JsonPayload, Native

PLACEHOLDER = "[REDACTED]"

# The shapes of keys people paste: OpenAI's and Anthropic's (`sk-`, `sk-ant-`, `sk-proj-`),
# AWS access key ids, Google API keys (Gemini's), GitHub tokens, Slack tokens, llproxy's
# own keys (stored keys are known only by their hash, so they are found by shape), and
# PEM private key blocks.
_SHAPES = (
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z0-9 ]*PRIVATE KEY-----",
    r"\bsk-[A-Za-z0-9_-]{20,}",
    r"\bAKIA[0-9A-Z]{16}\b",
    r"\bAIza[0-9A-Za-z_-]{35}",
    r"\bgh[pousr]_[A-Za-z0-9]{30,}",
    r"\bxox[abpr]-[A-Za-z0-9-]{10,}",
    r"\bllp-[A-Za-z0-9_-]{40,}",
)
# Configured secrets shorter than this are not looked for: too likely to be ordinary text.
MIN_SECRET_LENGTH = 12


class Redactor:
    """One pattern for every secret it looks for: the configured ones by value (longest
    first, so one that contains another is replaced whole) and the shapes."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        known = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
        self._source = "|".join([*map(re.escape, known), *_SHAPES])
        self._pattern: Any = None

    def text(self, text: str) -> tuple[str, int]:
        """The text with its secrets replaced, and how many there were."""
        if self._pattern is None:
            # RE2: one linear pass whatever the alternatives (Python's re took 60 times as
            # long on a 100 kB prompt, measured), and no pattern here can backtrack. It is
            # imported with the first prompt redacted: 2.6 MB a worker whose replicas are
            # not marked `redact` never needs.
            import re2  # type: ignore[import-untyped]

            self._pattern = re2.compile(self._source)
        text, count = self._pattern.subn(PLACEHOLDER, text)
        return text, count

    def value(self, value: Any) -> tuple[Any, int]:
        """A JSON value with every string in it redacted (keys are a schema's, not a
        prompt's: left as they are); the same object when nothing was replaced."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            items = [self.value(item) for item in value]
            count = sum(n for _, n in items)
            return ([item for item, _ in items] if count else value), count
        if isinstance(value, dict):
            # Anthropic's plain-text document source has a media type too: its data is text.
            media = not _MEDIA_KEYS.isdisjoint(value) and value.get("type") != "text"
            pairs = {
                key: (item, 0) if _encoded(key, item, media) else self.value(item)
                for key, item in value.items()
            }
            count = sum(n for _, n in pairs.values())
            return ({key: item for key, (item, _) in pairs.items()} if count else value), count
        return value, 0

    def call(self, call: Call, backend: str) -> tuple[Call, int]:
        """The call with what `backend` sends of it redacted: the client's own request
        when it is in that backend's dialect (it is passed on instead), else the JSON body.
        A form upload (audio, images) is no prompt text and goes as it is."""
        payload = call.payload
        if not isinstance(payload, JsonPayload):
            return call, 0
        native = payload.native
        if native is not None and native.dialect == backend:
            body, count = self.value(native.body)
            redacted = JsonPayload(payload.body, Native(native.dialect, body, native.headers))
        else:
            body, count = self.value({k: v for k, v in payload.body.items() if k != "model"})
            redacted = JsonPayload({**payload.body, **body}, native)
        return (replace(call, payload=redacted), count) if count else (call, 0)


# Beside an encoded `data`, the fields that say it is a file's bytes (Anthropic's
# `source`, Gemini's `inlineData`/`fileData`, Ollama's images): a `data` without them
# (a tool's input, say) is prompt text like any other.
_MEDIA_KEYS = frozenset(("media_type", "mimeType", "mime_type"))
# A data URL: a media type, its parameters, base64 and nothing but base64 after it. A
# text that merely starts with "data:" (a pasted SSE log) is prompt text.
_DATA_URL = re.compile(r"data:[^\s,;]*(?:;[^\s,;]*)*;base64,[A-Za-z0-9+/=_-]*")


def _encoded(key: str, value: Any, media: bool) -> bool:
    """An image's or a file's bytes, encoded (Anthropic's `source.data`, Gemini's
    `inlineData.data`, a `data:` URL): no prompt text, and a replacement would break it."""
    if not isinstance(value, str):
        return False
    if key == "data" and media:
        return True
    return value.startswith("data:") and _DATA_URL.fullmatch(value) is not None
