"""Per-process serving state, and the keys the app and its boundary find it under."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from ..backends.openai_http.client import Exchange, UpstreamClient
from ..backends.openai_http.discovery import DiscoveryLoop, ScanResult
from ..config import Config
from ..core.keys import KeyRing
from ..core.ratelimit import HitFunction, parse_networks
from ..core.registry import Registry
from ..core.usage import UsageRecord, WriterTelemetry
from ..gateway.hardening import accepted_hosts
from ..telemetry.metrics import DiscoveryTelemetry, Telemetry


class ProxyState:
    """Per-process serving state; `registry` is swapped whole, never mutated."""

    def __init__(self, config: Config, worker_id: int = 0) -> None:
        self.config = config
        self.worker_id = worker_id
        self.workers = 1
        # Requests being answered, and whether this process is retiring (then every answer
        # says `Connection: close`).
        self.active_requests = 0
        self.draining = False
        self.registry = Registry()
        self.models_body = listing_body(self.registry.listing())
        self.upstreams: UpstreamClient | None = None
        self.discovery: DiscoveryLoop | None = None
        self.telemetry = Telemetry()
        # Where /metrics comes from: this process alone, or (in a worker) the supervisor,
        # which merges every worker's numbers.
        self.discovery_telemetry: DiscoveryTelemetry | None = None
        self.metrics_source: Callable[[], Awaitable[bytes]] | None = None
        self.keys = KeyRing()
        # Who counts requests against rate limits; None until the app starts.
        self.rate_hit: HitFunction | None = None
        self.trusted_proxies = parse_networks(config.trusted_proxies)
        self.accepted_hosts = accepted_hosts(config)
        self.forward_paths = INFERENCE_PATHS | frozenset(config.forward_paths)
        # Usage records wait here for whoever writes them (this process, or the supervisor).
        self.pending_usage: list[UsageRecord] = []
        self.usage_telemetry: WriterTelemetry | None = None  # when this process writes them

    def take_usage(self) -> list[UsageRecord]:
        records, self.pending_usage = self.pending_usage, []
        return records

    def take_scan(self, result: ScanResult) -> None:
        if self.discovery_telemetry is not None:
            self.discovery_telemetry.record(result)
        self.set_registry(result.registry)

    def set_registry(self, registry: Registry) -> None:
        # Serialise once per snapshot rather than per GET /v1/models.
        self.models_body = listing_body(registry.listing())
        self.registry = registry


# Paths below /v1/ that llproxy forwards to an upstream (`forward_paths` adds to them).
INFERENCE_PATHS = frozenset(
    {
        "chat/completions",
        "completions",
        "embeddings",
        "rerank",
        "reranking",
        "score",
        "moderations",
        "audio/transcriptions",
        "audio/translations",
        "audio/speech",
        "images/generations",
        "images/edits",
        "images/variations",
    }
)

STATE = web.AppKey("llproxy_state", ProxyState)
EXCHANGE = web.RequestKey("llproxy_exchange", Exchange)


def listing_body(entries: Sequence[Mapping[str, Any]]) -> bytes:
    """The body of GET /v1/models for these model entries."""
    return orjson.dumps({"object": "list", "data": entries})
