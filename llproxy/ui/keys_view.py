"""`llproxy keys list`: the key table, or JSON. Never shows a secret (none is stored)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table

from ..core.keys import ApiKey
from .report import print_json


def _when(stamp: float | None) -> str:
    return "" if stamp is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def key_status(key: ApiKey, now: float) -> str:
    if key.revoked is not None:
        return "revoked"
    return "active" if key.active(now) else "expired"


def key_rows(keys: list[ApiKey]) -> list[dict[str, Any]]:
    now = time.time()
    return [
        {
            "name": k.name,
            "fingerprint": k.fingerprint,
            "models": list(k.models),
            "created": k.created,
            "expires": k.expires,
            "revoked": k.revoked,
            "rate_limit": k.rate_limit,
            "status": key_status(k, now),
        }
        for k in keys
    ]


def show_keys(keys: list[ApiKey], as_json: bool) -> None:
    rows = key_rows(keys)
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} API keys")
    for column in ("name", "fingerprint", "models", "rate limit", "status", "created", "expires"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"],
            row["fingerprint"],
            ", ".join(row["models"]) or "*",
            row["rate_limit"] or "default",
            row["status"],
            _when(row["created"]),
            _when(row["expires"]),
        )
    Console().print(table)
