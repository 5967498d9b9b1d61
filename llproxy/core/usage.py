"""The usage record: one per request that reached a model, kept for `llproxy usage`.

Token counts are the upstream's own `usage`, or null: llproxy never invents numbers.
"""

from __future__ import annotations

from typing import NamedTuple


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
