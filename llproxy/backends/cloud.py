"""The back-end dialects besides OpenAI's: how discovery lists each one's models, and the
field that names a model's dialect in the listings llproxy gives."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..core.registry import Upstream
from .anthropic.listing import anthropic_entries
from .gemini.listing import gemini_entries

# GET a bounded JSON document from a URL with the upstream's headers; raises when there is
# none (discovery's own getter, so bounds and timeouts are the same for every dialect).
GetJson = Callable[[str, Upstream, float], Awaitable[Any]]
Listing = Callable[[GetJson, Upstream, float], Awaitable[list[dict[str, Any]]]]

# Where each back-end dialect lists its models, below the upstream's base URL: what a
# light probe of a server asks for (probe.py).
LISTING_PATHS: Mapping[str, str] = {
    "openai": "/models",
    "anthropic": "/v1/models",
    "gemini": "/v1beta/models",
}

CLOUD_LISTINGS: Mapping[str, Listing] = {
    "anthropic": anthropic_entries,
    "gemini": gemini_entries,
}


def dialect_field(upstream: Upstream) -> dict[str, str]:
    """What a model's listing entry says of its server's dialect (nothing for OpenAI's,
    the default, so those entries stay as their servers wrote them)."""
    return {} if upstream.dialect == "openai" else {"dialect": upstream.dialect}


def backend_of(upstream: Upstream) -> str:
    """The name of the Backend that answers for a server (in the router's backends): a
    cloud dialect's is the dialect's name."""
    return "openai_http" if upstream.dialect == "openai" else upstream.dialect
