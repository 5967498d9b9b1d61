"""What the master shares with its workers, over their channels: usage records written to
the database, metrics merged over every worker, the console's stats, and counting the
clients a worker's rate table cannot hold."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from ..config import Config
from ..stores import usage_writer
from ..stores.memory import DequeWindows
from ..telemetry.desk import desk_families
from ..telemetry.metrics import DiscoveryTelemetry, Telemetry, render
from .channel import (
    Calls,
    MetricsReply,
    RateLimitReply,
    StatsReply,
    StatsRequest,
)
from .desk import DeskHost
from .fleet import desk_in_hand, host_desk

log = logging.getLogger("llproxy.supervisor")

STATS_TIMEOUT = 2.0


class MasterServices:
    def __init__(self, config: Config) -> None:
        self.usage = usage_writer(config)
        self.overflow = DequeWindows()
        self.discovery_telemetry = DiscoveryTelemetry()
        # Numbers of workers that exited, and the latest numbers of each live one.
        self.retired = Telemetry()
        self.last_seen: dict[int, Telemetry] = {}
        # The operators' desk of the whole host (or its port to the fleet's), and its ends
        # in the workers.
        self.desk = host_desk(config)
        self.desks = DeskHost(self.desk)

    async def stats(self, workers: Iterable[tuple[int, Calls]]) -> list[StatsReply]:
        """Every serving worker's numbers (those that answer within STATS_TIMEOUT)."""
        asked = list(workers)

        async def ask(calls: Calls) -> StatsReply | str:
            try:
                reply: StatsReply = await calls.call(StatsRequest, STATS_TIMEOUT)
            except TimeoutError:
                return "silent"
            except ConnectionError:
                return "gone"
            return reply

        answers = await asyncio.gather(*(ask(calls) for _, calls in asked))
        replies = [reply for reply in answers if isinstance(reply, StatsReply)]
        # A worker that exited while asked (retired by a reload, say) is no fault: its
        # last word carries its numbers. One that stayed silent is busy or stuck.
        silent = [worker for (worker, _), a in zip(asked, answers, strict=True) if a == "silent"]
        if silent:
            log.warning(
                "worker %s sent no numbers within %g s (busy or stuck): their last "
                "numbers stand in for them in stats and /metrics",
                ", ".join(map(str, silent)),
                STATS_TIMEOUT,
            )
        for reply in replies:
            self.last_seen[reply.worker_id] = reply.telemetry
        return sorted(replies, key=lambda r: r.worker_id)

    def stores(self, replies: list[StatsReply]) -> dict[str, dict[str, Any]]:
        """The stores as a worker sees them, with the usage writer's state: the master
        writes the records, so it is the one that knows."""
        stores = dict(replies[0].stores) if replies else {}
        if "usage" in stores:
            stores["usage"] = {
                **stores["usage"],
                "reachable": self.usage.reachable,
                "spooled": self.usage.telemetry.spooled,
            }
        return stores

    def worker_exited(self, worker_id: int) -> None:
        last = self.last_seen.pop(worker_id, None)
        if last is not None:
            self.retired.merge(last, live=False)

    async def metrics(self, token: int, workers: Iterable[tuple[int, Calls]]) -> MetricsReply:
        merged = Telemetry()
        merged.merge(self.retired, live=False)
        for reply in await self.stats(workers):
            merged.merge(reply.telemetry)
        held = desk_in_hand(self.desk)
        desk = desk_families(held) if held is not None else ()
        body = render(merged, self.discovery_telemetry, self.usage.telemetry, desk)
        return MetricsReply(token, body)

    async def count(self, token: int, limit: str, client: str) -> RateLimitReply:
        try:
            return RateLimitReply(token, await self.overflow.hit(limit, client))
        except Exception:
            log.exception("rate limit check failed")
            return RateLimitReply(token, None)
