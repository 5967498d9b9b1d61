"""Per-process serving state, and the keys the app and its handlers find it under."""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from ..backends.anthropic import BACKEND as ANTHROPIC_BACKEND
from ..backends.anthropic import AnthropicBackend
from ..backends.gemini import BACKEND as GEMINI_BACKEND
from ..backends.gemini import GeminiBackend
from ..backends.openai_http import OpenAIHttpBackend
from ..backends.openai_http.discovery import DiscoveryLoop, ScanResult
from ..backends.openai_http.transport import response_bounds
from ..backends.operator import BACKEND as OPERATOR_BACKEND
from ..backends.operator import OperatorBackend
from ..backends.probe import Probes
from ..backends.redacting import Redacting, RedactingCounter
from ..config import Config
from ..core.call import Backend, Call, Reply, TokenCounter
from ..core.commands import Commands
from ..core.desk import Desk
from ..core.errors import ProxyError
from ..core.health import Health
from ..core.mend.policy import MendPolicy
from ..core.record import RequestRecord
from ..core.redact import Redactor
from ..core.registry import Registry, Replica
from ..core.router import Router
from ..core.turn import TurnStages
from ..dialects import Dialect, Route
from ..dialects.anthropic import AnthropicDialect
from ..dialects.gemini import GeminiDialect
from ..dialects.ollama import OllamaDialect
from ..dialects.openai import OpenAIDialect
from ..dialects.responses import ResponsesDialect
from ..gateway import Gateway
from ..gateway.accounting import Accounting
from ..stores import Services, database_errors, usage_totals
from ..telemetry.capture import CaptureWriter
from ..telemetry.desk import desk_families
from ..telemetry.metrics import DiscoveryTelemetry, Telemetry, render
from .respond import Delivery

log = logging.getLogger("llproxy.server")


class ProxyState:
    """One serving process: its config, its stores, the registry snapshot it serves (swapped
    whole, never mutated), and the parts a request passes through."""

    def __init__(self, config: Config, services: Services, worker_id: int = 0) -> None:
        self.config = config
        self.services = services
        self.worker_id = worker_id
        self.workers = 1
        # Requests being answered, and whether this process is retiring (then every answer
        # says `Connection: close`).
        self.active_requests = 0
        self.draining = False
        self.registry = Registry()
        self.telemetry = Telemetry()
        self.discovery_telemetry: DiscoveryTelemetry | None = None  # when it scans itself
        # Where /metrics comes from: this process's own numbers, or (in a worker) the
        # supervisor's merge of every worker's.
        self.metrics: Callable[[], Awaitable[bytes]] = self._own_metrics
        self.backend = OpenAIHttpBackend(config.timeouts, response_bounds(config), config.instance)
        self.operators = OperatorBackend(
            config.endpoints, services.desk, config.timeouts.stream_keepalive, worker_id
        )
        anthropic, gemini = AnthropicBackend(self.backend), GeminiBackend(self.backend)
        # Secrets out of what goes to a replica marked `redact`, whichever backend serves it.
        redactor = Redactor(config.secrets())
        # What counts tokens with a model's own server, by the backend that serves it.
        self.counters: dict[str, TokenCounter] = {
            name: RedactingCounter(counter, redactor)
            for name, counter in (
                ("openai_http", self.backend),
                (ANTHROPIC_BACKEND, anthropic),
                (GEMINI_BACKEND, gemini),
            )
        }
        backends: dict[str, Backend] = {
            "openai_http": self.backend,
            OPERATOR_BACKEND: self.operators,
            ANTHROPIC_BACKEND: anthropic,
            GEMINI_BACKEND: gemini,
        }
        settings = config.health
        self.health = Health(
            settings.failures,
            settings.ejection,
            settings.max_ejection,
            enable=settings.enable,
            exempt=(OPERATOR_BACKEND,),  # a person is not a server that fails
            observer=self,
        )
        self.probes = Probes(config, self.health, lambda: self.registry)
        self.router = Router(
            lambda: self.registry,
            {name: Redacting(backend, redactor) for name, backend in backends.items()},
            config.aliases,
            config.discovery.reexport,
            self.health,
        )
        self.turns = TurnStages(
            self._commands(config), config.tool_loops.mode, config.tool_loops.repeats
        )
        self.operators.handoff = self._hand_off
        if isinstance(services.desk, Desk):  # held here: it asks this registry
            services.desk.exists = self._exists
        elif config.redis_url is not None:  # a fleet's port may come to hold it
            # Imported only then: the fleet's module imports redis-py, 10 MB a worker.
            from ..process.fleet import FleetDesk

            if isinstance(services.desk, FleetDesk):
                services.desk.exists = self._exists
        # The operator sockets open in this process, closed when it retires.
        self.operator_sockets: set[web.WebSocketResponse] = set()
        self.gateway = Gateway(config, services.keys, services.rate)
        capture = (
            None
            if config.capture is None
            else CaptureWriter(config.capture, worker_id, config.secrets())
        )
        self.accounting = Accounting(self.telemetry, services.usage, worker_id, capture)
        self.dialects: tuple[Dialect, ...] = (
            OpenAIDialect(config.forward_paths),
            AnthropicDialect(),
            ResponsesDialect(),
            OllamaDialect(),
            GeminiDialect(),
        )
        self.paths = DialectPaths(self.dialects)
        self.mending = MendPolicy(config.mending)

    def _commands(self, config: Config) -> Commands | None:
        if not config.commands.enable:
            return None

        unreachable: tuple[type[Exception], ...] = (sqlite3.Error, *database_errors(config))

        async def today(client: str) -> list[dict[str, Any]] | None:
            # The fleet's records with database_url (this host's SQLite has none then).
            midnight = time.mktime((*time.localtime()[:3], 0, 0, 0, 0, 0, -1))
            try:
                return await usage_totals(config, midnight, "model", client)
            except unreachable as exc:
                log.warning("cannot read usage for a command: %s", exc)
                return None

        return Commands(
            config.commands.prefix,
            config.commands.disabled_keys,
            self.router.listing,
            self.router.resolve,
            today,
        )

    async def _hand_off(self, call: Call, record: RequestRecord) -> Reply:
        """An operator's request answered by a model after all (the client's key still
        decides what it may reach)."""
        chain = self.router.chain(call.model, record.key)
        return await self.router.send(call, chain, record)

    def _exists(self, name: str) -> bool:
        try:
            self.router.resolve(name, None)
        except ProxyError:
            return False
        return True

    def set_registry(self, registry: Registry) -> None:
        self.registry = registry
        self.health.keep_only({r for m in registry.models.values() for r in m.replicas})

    def ejected(self, replica: Replica, model: str, seconds: float) -> None:
        """Replica health's news (HealthObserver): counted, and the probes rescheduled."""
        self.telemetry.count_ejection(model, replica.address)
        if self.config.health.probe:
            self.probes.wake()

    def reinstated(self, replica: Replica, model: str) -> None:
        """Nothing to do: the numbers read each replica's state when they are asked."""

    def numbers(self) -> Telemetry:
        """This process's numbers, with each replica's health as it is now."""
        states = self.health.states(self.registry.models.values())
        self.telemetry.ejected = {key: int(left is not None) for key, left in states.items()}
        self.telemetry.trial_in = {k: left for k, left in states.items() if left is not None}
        return self.telemetry

    def take_scan(self, result: ScanResult) -> None:
        """A scan of this process's own."""
        if self.discovery_telemetry is None:
            self.discovery_telemetry = DiscoveryTelemetry()
        self.discovery_telemetry.record(result)
        self.set_registry(result.registry)

    async def _own_metrics(self) -> bytes:
        # A process that serves alone made its desk with the fleet's module (host_desk).
        from ..process.fleet import desk_in_hand

        desk = desk_in_hand(self.services.desk)
        held = desk_families(desk) if desk is not None else ()
        return render(self.numbers(), self.discovery_telemetry, self.services.usage.telemetry, held)


STATE = web.AppKey("llproxy_state", ProxyState)
DISCOVERY = web.AppKey("llproxy_discovery", DiscoveryLoop)
RECORD = web.RequestKey("llproxy_record", RequestRecord)
DELIVERY = web.RequestKey("llproxy_delivery", Delivery)


class RouteSpec:
    """What the boundary knows of a matched route: its dialect, its guard, and whether
    its requests are accounted (a dialect's are; health, metrics, admin are not)."""

    __slots__ = ("accounted", "dialect", "route")

    def __init__(self, dialect: Dialect, route: Route, accounted: bool = True) -> None:
        self.dialect = dialect
        self.route = route
        self.accounted = accounted


# Each route's specs: one, or several dialects' for a shared path (told apart by header).
ROUTES = web.AppKey("llproxy_routes", dict[Any, tuple[RouteSpec, ...]])
SPEC = web.RequestKey("llproxy_spec", RouteSpec)


def select(specs: tuple[RouteSpec, ...], headers: Mapping[str, str]) -> RouteSpec:
    """The spec a request matches: the first whose header it carries, else the one that
    needs none."""
    for spec in specs:
        if spec.route.header is None or spec.route.header in headers:
            return spec
    return specs[-1]


class DialectPaths:
    """The dialect whose path a request's is when none of its routes took the request's
    method (a 405): its answer is in that dialect's shape, not the default one."""

    def __init__(self, dialects: Sequence[Dialect]) -> None:
        # Header-bound routes first, as `select` orders them.
        routes = sorted(
            ((dialect, route) for dialect in dialects for route in dialect.routes),
            key=lambda pair: pair[1].header is None,
        )
        self._paths = [(_pattern(route.path), route.header, dialect) for dialect, route in routes]
        self.default = dialects[0]

    def dialect(self, path: str, headers: Mapping[str, str]) -> Dialect:
        """The dialect of the first route on this path whose header the request carries;
        else of one whose header it lacks (`/anthropic/v1/models` is Anthropic's all the
        same); else the default."""
        lacking = None
        for pattern, header, dialect in self._paths:
            if pattern.fullmatch(path):
                if header is None or header in headers:
                    return dialect
                lacking = lacking or dialect
        return lacking or self.default


def _pattern(path: str) -> re.Pattern[str]:
    """A route's path (`/v1/models/{name}`) as the paths it matches."""
    parts = re.split(r"\{[^}]*\}", path)
    return re.compile("[^/]+".join(re.escape(part) for part in parts))
