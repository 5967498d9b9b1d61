"""Anthropic's model listing (`GET /v1/models`, paged by `after_id`) as registry entries,
with each model's context and output limits where the listing says them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

from ...core.registry import Upstream

PAGE_SIZE = 1000
MAX_PAGES = 20  # bounds a listing that never says it has no more


async def anthropic_entries(
    get_json: Callable[[str, Upstream, float], Awaitable[Any]], upstream: Upstream, timeout: float
) -> list[dict[str, Any]]:
    """Every model the account may use; ValueError when the answer is not Anthropic's."""
    entries: list[dict[str, Any]] = []
    after = ""
    for _ in range(MAX_PAGES):
        url = f"{upstream.base_url}/v1/models?limit={PAGE_SIZE}"
        if after:
            url += f"&after_id={quote(after, safe='')}"
        page = await get_json(url, upstream, timeout)
        data = page.get("data") if isinstance(page, dict) else None
        if not isinstance(data, list):
            raise ValueError("its model list is not Anthropic-shaped")
        entries += [_entry(item, upstream) for item in data if _named(item)]
        last = page.get("last_id")
        if page.get("has_more") is not True or not isinstance(last, str) or not last:
            break
        after = last
    return entries


def _named(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("id"), str) and bool(item["id"])


def _entry(item: dict[str, Any], upstream: Upstream) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": item["id"],
        "object": "model",
        "created": _epoch(item.get("created_at")),
        "owned_by": upstream.hostname,
        "dialect": "anthropic",
    }
    if isinstance(item.get("display_name"), str):
        entry["display_name"] = item["display_name"]
    # `context_length` is the key discovery reads a model's context from.
    for ours, theirs in (
        ("context_length", "max_input_tokens"),
        ("max_output_tokens", "max_tokens"),
    ):
        value = item.get(theirs)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            entry[ours] = value
    return entry


def _epoch(stamp: Any) -> int:
    if not isinstance(stamp, str):
        return 0
    try:
        return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
