"""Request telemetry: cheap per-process counters, merged and rendered as Prometheus text.

Recording is a few dict updates per request. prometheus_client's own multiprocess mode
writes an mmap under a lock for every increment, which cost a fifth of a worker's CPU
in profiles, so each worker keeps plain numbers and the supervisor merges the workers'
snapshots when /metrics is scraped. Names follow vLLM (`*_prompt_tokens_total`,
`*_generation_tokens_total`, `*_time_to_first_token_seconds`) and the OpenTelemetry
GenAI conventions (`gen_ai_client_operation_duration_seconds`) where they apply.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# prometheus_client is imported where the text is rendered: a worker only counts (its
# supervisor renders), and the library would cost it about 1 MB it never uses.
if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from ..backends.openai_http.discovery import ScanResult
    from ..stores.sqlite import WriterTelemetry

# What an answer's mending counts, each a counter by model.
MENDED = {
    "tool_calls_repaired": "Tool calls a model wrote as text, made real tool calls",
    "tool_calls_unrepaired": "Tool calls a model wrote as text that stayed text (not valid)",
    "loops_cut": "Streams cut because the model kept repeating itself",
}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Generation is slow: buckets reach minutes, and start fine enough for proxy overhead.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SCAN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


@dataclass(slots=True)
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, the last one is +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def add(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total

    def cumulative(self) -> list[tuple[str, float]]:
        running, out = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


def _add_counts(into: dict[Any, int], other: dict[Any, int]) -> None:
    for key, value in other.items():
        into[key] = into.get(key, 0) + value


def _observe(table: dict[str, Histogram], model: str, seconds: float) -> None:
    histogram = table.get(model)
    if histogram is None:
        histogram = table[model] = Histogram(LATENCY_BUCKETS)
    histogram.observe(seconds)


@dataclass(slots=True)
class Telemetry:
    """One process's numbers since it started; picklable, mergeable."""

    # (model, status, dialect): the client's dialect, so each front end shows its traffic.
    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    generation_tokens: dict[str, int] = field(default_factory=dict)
    time_to_first_token: dict[str, Histogram] = field(default_factory=dict)
    duration: dict[str, Histogram] = field(default_factory=dict)
    upstream_errors: dict[tuple[str, str], int] = field(default_factory=dict)
    # (model, what): answers mended on the way (core/mend), by MENDED's kinds.
    mended: dict[tuple[str, str], int] = field(default_factory=dict)
    # The wire capture: exchanges queued for writing, and dropped because its queue was full.
    captured: int = 0
    capture_dropped: int = 0
    # Replica health (core/health.py) by (model, upstream): ejections since start; and for
    # each replica this process serves, 1 while it holds it ejected (summed over workers:
    # how many do) and the seconds until its trial may start (the soonest of them).
    ejections: dict[tuple[str, str], int] = field(default_factory=dict)
    ejected: dict[tuple[str, str], int] = field(default_factory=dict)
    trial_in: dict[tuple[str, str], float] = field(default_factory=dict)
    # The request stages (core/turn.py): turns by what they did, secrets replaced.
    stages: dict[str, int] = field(default_factory=dict)
    redactions: int = 0

    def count_request(self, model: str, status: int, dialect: str) -> None:
        key = (model, str(status), dialect)
        self.requests[key] = self.requests.get(key, 0) + 1

    def record_answer(
        self,
        model: str,
        status: int,
        dialect: str,
        seconds: float,
        first_token_seconds: float | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        """Everything about one answer of a known model, in one call: it runs per request."""
        self.count_request(model, status, dialect)
        _observe(self.duration, model, seconds)
        if first_token_seconds is not None:
            _observe(self.time_to_first_token, model, first_token_seconds)
        if prompt_tokens is not None:
            self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + prompt_tokens
        if completion_tokens is not None:
            tokens = self.generation_tokens
            tokens[model] = tokens.get(model, 0) + completion_tokens

    def count_ejection(self, model: str, upstream: str) -> None:
        key = (model, upstream)
        self.ejections[key] = self.ejections.get(key, 0) + 1

    def merge(self, other: Telemetry, live: bool = True) -> None:
        """Add another process's numbers; `live=False` for a finished process (no
        in-flight, nothing it held ejected)."""
        _add_counts(self.requests, other.requests)
        _add_counts(self.ejections, other.ejections)
        if live:
            _add_counts(self.in_flight, other.in_flight)
            _add_counts(self.ejected, other.ejected)
            for key, seconds in other.trial_in.items():
                self.trial_in[key] = min(seconds, self.trial_in.get(key, seconds))
        _add_counts(self.prompt_tokens, other.prompt_tokens)
        _add_counts(self.generation_tokens, other.generation_tokens)
        _add_counts(self.upstream_errors, other.upstream_errors)
        _add_counts(self.mended, other.mended)
        self.captured += other.captured
        _add_counts(self.stages, other.stages)
        self.redactions += other.redactions
        self.capture_dropped += other.capture_dropped
        for mine, theirs in (
            (self.time_to_first_token, other.time_to_first_token),
            (self.duration, other.duration),
        ):
            for model, histogram in theirs.items():
                mine.setdefault(model, Histogram(histogram.bounds)).add(histogram)

    def by_model(self) -> dict[str, dict[str, int]]:
        """The console's view: requests, errors, tokens and in-flight per model."""
        rows: dict[str, dict[str, int]] = {}

        def row(model: str) -> dict[str, int]:
            return rows.setdefault(
                model,
                {
                    "requests": 0,
                    "errors": 0,
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                    "in_flight": 0,
                },
            )

        for (model, status, _), count in self.requests.items():
            row(model)["requests"] += count
            if int(status) >= 400:
                row(model)["errors"] += count
        for model, count in self.prompt_tokens.items():
            row(model)["prompt_tokens"] += count
        for model, count in self.generation_tokens.items():
            row(model)["completion_tokens"] += count
        for model, count in self.in_flight.items():
            row(model)["in_flight"] += count
        return rows


@dataclass(slots=True)
class DiscoveryTelemetry:
    models: int = 0
    servers: int = 0
    scan_duration: Histogram = field(default_factory=lambda: Histogram(SCAN_BUCKETS))

    def record(self, result: ScanResult) -> None:
        self.models = len(result.registry.models)
        self.servers = result.registry.servers
        self.scan_duration.observe(result.duration_ms / 1000)


def _families(
    requests: Telemetry, discovery: DiscoveryTelemetry | None, usage: WriterTelemetry | None
) -> Iterator[Metric]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    counter = CounterMetricFamily(
        "llproxy_requests",
        "Requests answered, by model, HTTP status and the client's dialect",
        labels=["model", "status", "dialect"],
    )
    for labels, count in sorted(requests.requests.items()):
        counter.add_metric(list(labels), count)
    yield counter
    gauge = GaugeMetricFamily(
        "llproxy_requests_in_flight", "Requests being answered now", labels=["model"]
    )
    for model, count in sorted(requests.in_flight.items()):
        gauge.add_metric([model], count)
    yield gauge
    for name, text, table in (
        ("llproxy_prompt_tokens", "Prompt tokens reported by upstreams", requests.prompt_tokens),
        (
            "llproxy_generation_tokens",
            "Completion tokens reported by upstreams",
            requests.generation_tokens,
        ),
    ):
        tokens = CounterMetricFamily(name, text, labels=["model"])
        for model, count in sorted(table.items()):
            tokens.add_metric([model], count)
        yield tokens
    for name, text, histograms in (
        (
            "llproxy_time_to_first_token_seconds",
            "Time from request to the upstream's first byte",
            requests.time_to_first_token,
        ),
        (
            "gen_ai_client_operation_duration_seconds",
            "Total time of a proxied request",
            requests.duration,
        ),
    ):
        family = HistogramMetricFamily(name, text, labels=["model"])
        for model, histogram in sorted(histograms.items()):
            family.add_metric([model], histogram.cumulative(), histogram.total)
        yield family
    errors = CounterMetricFamily(
        "llproxy_upstream_errors", "Upstream failures by kind", labels=["upstream", "kind"]
    )
    for (upstream, kind), count in sorted(requests.upstream_errors.items()):
        errors.add_metric([upstream, kind], count)
    yield errors
    for kind, text in MENDED.items():
        mended = CounterMetricFamily(f"llproxy_{kind}", text, labels=["model"])
        for (model, what), count in sorted(requests.mended.items()):
            if what == kind:
                mended.add_metric([model], count)
        yield mended
    ejections = CounterMetricFamily(
        "llproxy_replica_ejections",
        "Replicas ejected after failing requests in a row (or a failed trial)",
        labels=["model", "upstream"],
    )
    for (model, upstream), count in sorted(requests.ejections.items()):
        ejections.add_metric([model, upstream], count)
    yield ejections
    ejected = GaugeMetricFamily(
        "llproxy_replica_ejected",
        "Serving processes that hold this replica ejected now (0: every one sends to it)",
        labels=["model", "upstream"],
    )
    for (model, upstream), count in sorted(requests.ejected.items()):
        ejected.add_metric([model, upstream], count)
    yield ejected
    if requests.captured or requests.capture_dropped:  # the capture is on
        yield CounterMetricFamily(
            "llproxy_capture_exchanges", "Exchanges queued for the wire capture", requests.captured
        )
        yield CounterMetricFamily(
            "llproxy_capture_dropped",
            "Exchanges the wire capture dropped because its queue was full",
            requests.capture_dropped,
        )
    stages = CounterMetricFamily(
        "llproxy_request_stages",
        "Chat turns llproxy acted on: a command answered, a tool loop warned or broken",
        labels=["stage"],
    )
    for stage, count in sorted(requests.stages.items()):
        stages.add_metric([stage], count)
    yield stages
    yield CounterMetricFamily(
        "llproxy_redactions",
        "Secrets replaced in prompts before they went to a back-end marked redact",
        requests.redactions,
    )
    if discovery is not None:
        yield GaugeMetricFamily("llproxy_models", "Models in the registry", value=discovery.models)
        yield GaugeMetricFamily(
            "llproxy_servers", "Upstream servers found by the last scan", value=discovery.servers
        )
        scan = HistogramMetricFamily("llproxy_scan_duration_seconds", "Time of one discovery pass")
        scan.add_metric([], discovery.scan_duration.cumulative(), discovery.scan_duration.total)
        yield scan
    if usage is not None:
        for name, text, value in (
            ("llproxy_usage_records_written", "Usage records written", usage.written),
            (
                "llproxy_usage_records_dropped",
                "Usage records dropped because the database stayed unwritable",
                usage.dropped,
            ),
            (
                "llproxy_usage_write_errors",
                "Failed writes of usage records (the records are kept for the next try)",
                usage.write_errors,
            ),
            (
                "llproxy_usage_database_recreated",
                "Times the usage database vanished while in use and was made anew",
                usage.recreated,
            ),
        ):
            yield CounterMetricFamily(name, text, value=value)
        yield GaugeMetricFamily(
            "llproxy_usage_records_spooled",
            "Usage records waiting in the local spool for the shared database to be back",
            value=usage.spooled,
        )


class _Snapshot:  # a prometheus_client Collector (a protocol)
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def render(
    requests: Telemetry,
    discovery: DiscoveryTelemetry | None = None,
    usage: WriterTelemetry | None = None,
    more: Iterable[Metric] = (),
) -> bytes:
    """Prometheus text; `more` adds the families of what only this process holds (the
    operators' desk)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot([*_families(requests, discovery, usage), *more]))
    return generate_latest(registry)
