"""Prometheus metrics, aggregated over every process of one daemon.

Names follow vLLM (`*_prompt_tokens_total`, `*_generation_tokens_total`,
`*_time_to_first_token_seconds`) and the OpenTelemetry GenAI conventions
(`gen_ai_*` for client token usage and operation duration) where they apply. Under the
supervisor, PROMETHEUS_MULTIPROC_DIR is set before any process imports prometheus_client,
so workers and the master write shared files and any worker can answer a scrape.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

# Generation is slow: buckets reach minutes, and start fine for proxy overhead.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "llproxy_requests", "Requests answered, by model and HTTP status", ["model", "status"]
)
IN_FLIGHT = Gauge(
    "llproxy_requests_in_flight",
    "Requests being answered now",
    ["model"],
    multiprocess_mode="livesum",
)
PROMPT_TOKENS = Counter("llproxy_prompt_tokens", "Prompt tokens reported by upstreams", ["model"])
GENERATION_TOKENS = Counter(
    "llproxy_generation_tokens", "Completion tokens reported by upstreams", ["model"]
)
TIME_TO_FIRST_TOKEN = Histogram(
    "llproxy_time_to_first_token_seconds",
    "Time from request to the upstream's first byte",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
REQUEST_DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "Total time of a proxied request",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "llproxy_upstream_errors", "Upstream failures by kind", ["upstream", "kind"]
)
MODELS = Gauge("llproxy_models", "Models in the registry", multiprocess_mode="livemostrecent")
SERVERS = Gauge(
    "llproxy_servers", "Upstream servers found by the last scan", multiprocess_mode="livemostrecent"
)
SCAN_DURATION = Histogram(
    "llproxy_scan_duration_seconds",
    "Time of one discovery pass",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)


def exposition() -> tuple[bytes, str]:
    """The current metrics of the whole daemon, in Prometheus text format."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def forget_process(pid: int) -> None:
    """Drop a dead process's live gauges (its counters still count)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
