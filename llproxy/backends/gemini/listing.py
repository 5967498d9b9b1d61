"""Gemini's model listing (`GET /v1beta/models`, paged by `pageToken`) as registry entries:
the models that can `generateContent`, with their input and output token limits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from ...core.registry import Upstream

PAGE_SIZE = 1000
MAX_PAGES = 20  # bounds a listing that never stops giving a next page


async def gemini_entries(
    get_json: Callable[[str, Upstream, float], Awaitable[Any]], upstream: Upstream, timeout: float
) -> list[dict[str, Any]]:
    """Every model the key may generate with; ValueError when the answer is not Gemini's."""
    entries: list[dict[str, Any]] = []
    token = ""
    for _ in range(MAX_PAGES):
        url = f"{upstream.base_url}/v1beta/models?pageSize={PAGE_SIZE}"
        if token:
            url += f"&pageToken={quote(token, safe='')}"
        page = await get_json(url, upstream, timeout)
        models = page.get("models") if isinstance(page, dict) else None
        if not isinstance(models, list):
            raise ValueError("its model list is not Gemini-shaped")
        entries += [_entry(item, upstream) for item in models if _generates(item)]
        token = page.get("nextPageToken") or ""
        if not isinstance(token, str) or not token:
            break
    return entries


def _generates(item: Any) -> bool:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return False
    methods = item.get("supportedGenerationMethods")
    return isinstance(methods, list) and "generateContent" in methods


def _entry(item: dict[str, Any], upstream: Upstream) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": item["name"].removeprefix("models/"),
        "object": "model",
        "created": 0,
        "owned_by": upstream.hostname,
        "dialect": "gemini",
    }
    if isinstance(item.get("displayName"), str):
        entry["display_name"] = item["displayName"]
    for ours, theirs in (
        ("context_length", "inputTokenLimit"),
        ("max_output_tokens", "outputTokenLimit"),
    ):
        value = item.get(theirs)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            entry[ours] = value
    return entry
