"""The aiohttp application: every dialect's routes, health, metrics, the admin API, and
the lifetimes of what the app owns.

The app serves whichever Registry snapshot its state holds; who replaces it (a discovery
loop in this process, or a supervisor feeding workers) is decided by whoever builds it.
Every request passes the boundary middleware first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from ..backends.openai_http.discovery import DiscoveryLoop
from ..config import Config
from ..dialects import Route
from ..stores import Services, build_services
from . import handlers, operator
from .admin import AdminApi
from .body import continue_later
from .handlers import Handler
from .middleware import boundary
from .state import DISCOVERY, ROUTES, STATE, ProxyState, RouteSpec

# Routes of llproxy's own (health, metrics, admin, preflights): no key, not accounted.
_SYSTEM = Route("*", "", "system", needs_key=False)


def create_app(
    config: Config, services: Services, *, worker_id: int = 0, discover: bool = True
) -> web.Application:
    """The llproxy app over these stores. With discover=False the caller feeds the
    registry (ProxyState.set_registry)."""
    app = web.Application(
        middlewares=[boundary],
        client_max_size=config.max_request_bytes,
        # Compressed request bodies are decoded by read_body, within their bound.
        handler_args={"max_field_size": 16384, "auto_decompress": False},
    )
    state = ProxyState(config, services, worker_id)
    app[STATE] = state
    routes: dict[Any, tuple[RouteSpec, ...]] = {}
    app[ROUTES] = routes
    paths: dict[str, None] = {}  # every path served, in order

    def add(method: str, path: str, handler: Handler, specs: tuple[RouteSpec, ...]) -> None:
        paths[path] = None
        for each in (method, "HEAD") if method == "GET" else (method,):
            route = app.router.add_route(each, path, handler, expect_handler=continue_later)
            routes[route] = specs

    # Dialects may share a path (GET /v1/models): its specs, the header-bound ones first.
    shared: dict[tuple[str, str], list[RouteSpec]] = {}
    for dialect in state.dialects:
        for route in dialect.routes:
            shared.setdefault((route.method, route.path), []).append(RouteSpec(dialect, route))
    for (method, path), specs in shared.items():
        ordered = tuple(sorted(specs, key=lambda spec: spec.route.header is None))
        add(method, path, handlers.route_handler, ordered)
    system = (RouteSpec(state.dialects[0], _SYSTEM, accounted=False),)
    add("GET", "/health", handlers.health, system)
    add("GET", operator.SOCKET_PATH, operator.operator_socket, system)
    add("GET", "/operator", operator.operator_root, system)
    add("GET", "/operator/", operator.operator_page, system)
    add("GET", "/operator/{file}", operator.operator_page, system)
    add("GET", "/metrics", handlers.metrics, system)
    if config.admin_key is not None:
        admin = AdminApi(config, services.key_sync.refresh_stored)
        for method, path, handler in admin.routes():
            add(method, path, handler, system)
    if config.cors_origins:
        # A preflight on each path served, not on every path: a catch-all would make
        # every unknown path a 405 (`Allow: OPTIONS`) instead of a 404.
        for path in list(paths):
            add("OPTIONS", path, handlers.preflight, system)
    app.cleanup_ctx.append(_lifetime)
    if discover:
        # Imported by the processes that scan (never a worker): redis-py comes with it.
        from ..process.fleet_scan import fleet_scan

        app[DISCOVERY] = DiscoveryLoop(config, state.take_scan, fleet_scan(config))
        app.cleanup_ctx.append(_local_discovery)
    return app


def serve_alone(config: Config) -> web.Application:
    """The app of a process that serves alone: it scans, counts and writes for itself."""
    from ..process.fleet import host_desk  # with redis-py, which a worker may not need

    return create_app(config, build_services(config, desk=host_desk(config)))


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.services.start()
    capture = state.accounting.capture
    if capture is not None:
        capture.start()
    if state.config.health.enable and state.config.health.probe:
        state.probes.start()
    yield
    await state.probes.close()
    if capture is not None:
        # The last exchanges written; in a thread, since the disk may be slow.
        await asyncio.get_running_loop().run_in_executor(None, capture.close)
    await state.backend.close()
    await state.services.close()


async def _local_discovery(app: web.Application) -> AsyncIterator[None]:
    discovery = app[DISCOVERY]
    await discovery.start()
    # Scan once before serving, so the first request already sees every model.
    await discovery.scan_now()
    yield
    await discovery.stop()
