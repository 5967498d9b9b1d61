"""The operators' desk in numbers: claims and ends counted as they happen, waits as
histograms, the queue and who is online read from the desk when /metrics is scraped.
Only the desk's holder (a process serving alone, or the master) has them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..core.desk import QUEUED, Desk, Ticket
from .metrics import Histogram

if TYPE_CHECKING:  # imported when the families are read (telemetry/metrics.py says why)
    from prometheus_client.core import Metric

# A person takes seconds to minutes; a queue may hold a request for an hour.
WAIT_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# The ends counted apart, as the administrator asks for them.
_COUNTED = {"rejected": "rejects", "handed off": "handoffs", "done": "finished"}


def _count(table: dict[str, int], model: str) -> None:
    table[model] = table.get(model, 0) + 1


def _observe(table: dict[str, Histogram], model: str, seconds: float) -> None:
    table.setdefault(model, Histogram(WAIT_BUCKETS)).observe(max(0.0, seconds))


@dataclass
class DeskTelemetry:
    """The desk's observer: counts by operator model since the holder started."""

    claims: dict[str, int] = field(default_factory=dict)
    rejects: dict[str, int] = field(default_factory=dict)
    handoffs: dict[str, int] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)
    cancelled: dict[str, int] = field(default_factory=dict)
    timeouts: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, waited)
    fallbacks: dict[str, int] = field(default_factory=dict)
    until_claimed: dict[str, Histogram] = field(default_factory=dict)
    until_finished: dict[str, Histogram] = field(default_factory=dict)
    _claimed_once: set[str] = field(default_factory=set)

    def claimed(self, ticket: Ticket) -> None:
        _count(self.claims, ticket.model)
        if ticket.id not in self._claimed_once:  # a claim after a release waited less
            self._claimed_once.add(ticket.id)
            _observe(self.until_claimed, ticket.model, time.time() - ticket.created)

    def ended(self, ticket: Ticket, outcome: str) -> None:
        self._claimed_once.discard(ticket.id)
        model = ticket.model
        if outcome == "timed out":
            waited = "queue_timeout" if ticket.state == QUEUED else "idle_timeout"
            key = (model, waited)
            self.timeouts[key] = self.timeouts.get(key, 0) + 1
            if ticket.fallback:
                _count(self.fallbacks, model)
        elif outcome == "cancelled":
            _count(self.cancelled, model)
        else:
            _count(getattr(self, _COUNTED[outcome]), model)
        if outcome == "done":
            _observe(self.until_finished, model, time.time() - ticket.created)


def desk_families(desk: Desk) -> Iterator[Metric]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    queued = GaugeMetricFamily(
        "llproxy_operator_queue_depth",
        "Requests waiting for an operator to claim them, by operator model",
        labels=["model"],
    )
    depth: dict[str, int] = {}
    for ticket in desk.tickets.values():
        if ticket.state == QUEUED:
            _count(depth, ticket.model)
    for model, count in sorted(depth.items()):
        queued.add_metric([model], count)
    yield queued
    yield GaugeMetricFamily(
        "llproxy_operators_online",
        "Operators connected now (people: one on two tabs counts once)",
        value=desk.operators_online(),
    )
    numbers = desk.observer
    if not isinstance(numbers, DeskTelemetry):
        return
    for name, text, table in (
        ("claims", "Claims granted (a claim again after a release counts again)", numbers.claims),
        ("rejects", "Requests rejected by an operator", numbers.rejects),
        ("handoffs", "Requests handed off to a model by an operator", numbers.handoffs),
        ("finished", "Requests an operator finished", numbers.finished),
        ("cancelled", "Requests whose client left before their end", numbers.cancelled),
        ("fallbacks", "Timed-out requests answered by the fallback model", numbers.fallbacks),
    ):
        family = CounterMetricFamily(f"llproxy_operator_{name}", text, labels=["model"])
        for model, count in sorted(table.items()):
            family.add_metric([model], count)
        yield family
    timeouts = CounterMetricFamily(
        "llproxy_operator_timeouts",
        "Requests whose deadline passed: queue_timeout unclaimed, idle_timeout claimed",
        labels=["model", "waited"],
    )
    for (model, waited), count in sorted(numbers.timeouts.items()):
        timeouts.add_metric([model, waited], count)
    yield timeouts
    for name, text, histograms in (
        (
            "llproxy_operator_wait_until_claimed_seconds",
            "Time from a request's arrival to its first claim",
            numbers.until_claimed,
        ),
        (
            "llproxy_operator_wait_until_finished_seconds",
            "Time from a request's arrival to the operator's finish",
            numbers.until_finished,
        ),
    ):
        waits = HistogramMetricFamily(name, text, labels=["model"])
        for model, histogram in sorted(histograms.items()):
            waits.add_metric([model], histogram.cumulative(), histogram.total)
        yield waits
