"""The libraries a worker imports only where a feature first needs them (ARCHITECTURE.md,
Processes), imported once by the master before it listens: one that is missing or broken
stops the start with a message that names it, as it did when every module imported its
libraries at its top, instead of failing each request that needs it later with a 500.
"""

from __future__ import annotations

import importlib

from ..config import Config
from ..core.redact import Redactor

# What a worker of any configuration may come to import, and what for. PostgreSQL's and
# Redis's libraries are not here: the master imports them itself before it listens.
LIBRARIES = {
    "llproxy.core.toolschema": "a tool call checked against its JSON Schema",
    "json_repair": "a tool call written as almost-JSON",
    "prometheus_client": "/metrics",
    "rich.text": "the log lines",
}


def missing_library(config: Config) -> str | None:
    """Why a worker would fail a feature of this configuration for want of a library (or
    a redaction pattern RE2 cannot compile), or None."""
    for module, use in LIBRARIES.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or whatever a broken extension raises
            return f"{use} needs {module}, which cannot be imported: {exc}"
    if any(endpoint.redact for endpoint in config.endpoints):
        try:
            Redactor(config.secrets()).text("")  # RE2 imported, the pattern compiled
        except Exception as exc:
            return f"`redact` needs RE2 and a pattern it can compile: {exc}"
    return None
