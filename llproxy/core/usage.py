"""The usage record: one per request that reached a model, kept for `llproxy usage`.

Token counts are the upstream's own `usage`, or null: llproxy never invents numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple


class UsageRecord(NamedTuple):
    """One proxied request. A tuple, so a batch pickles to a worker's channel cheaply
    (a slotted dataclass pickles through `dataclasses.fields`, which showed in profiles)
    and goes to SQLite as it is."""

    time: float
    client: str  # the API key's name, else the client's address
    model: str
    upstream: str | None
    status: int
    prompt_tokens: int | None
    completion_tokens: int | None
    duration_ms: float
    dialect: str = "openai"  # what the client spoke
    cut: str | None = None  # why llproxy cut the answer short ("loop": it kept repeating)


def from_anthropic(native: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's usage for Anthropic's, which counts cached prompt tokens apart: the prompt
    is input + cache read + cache creation, the read part also as `cached_tokens`, and
    the creation part kept under Anthropic's own name."""

    def count(name: str) -> int:
        value = native.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    read, created = count("cache_read_input_tokens"), count("cache_creation_input_tokens")
    prompt = count("input_tokens") + read + created
    completion = count("output_tokens")
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read},
        "cache_creation_input_tokens": created,
    }


def from_gemini(native: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's usage for Gemini's `usageMetadata`: the completion counts the thoughts too
    (as OpenAI's counts reasoning), which are also given as `reasoning_tokens`."""

    def count(name: str) -> int:
        value = native.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    thoughts = count("thoughtsTokenCount")
    prompt = count("promptTokenCount")
    completion = count("candidatesTokenCount") + thoughts
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": count("cachedContentTokenCount")},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }
