"""Discovery: probe every configured server for its models and build a Registry snapshot.

Ports of a range are first tried with a bare non-blocking connect, so a closed port costs
one refused SYN and no HTTP machinery; only open ports get `GET /v1/models`. Probes run
concurrently under a bound, with a short timeout and a cap on the response size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from .config import Config, Endpoint
from .registry import FoundModel, Registry, Upstream, final_names

log = logging.getLogger("llproxy.discovery")

MAX_LISTING_BYTES = 4 * 1024 * 1024
SCAN_CONCURRENCY = 256

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class ScanResult:
    registry: Registry
    duration_ms: float
    probed: int
    new: tuple[str, ...] = ()
    gone: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Target:
    endpoint: Endpoint
    upstream: Upstream


def _targets(endpoints: Sequence[Endpoint]) -> list[_Target]:
    targets = []
    for endpoint in endpoints:
        if not endpoint.enable:
            continue
        for base_url in endpoint.base_urls():
            parts = urlsplit(base_url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            upstream = Upstream(
                base_url=base_url,
                hostname=parts.hostname or "",
                port=port,
                tags=endpoint.tags,
                apikey=endpoint.apikey,
            )
            targets.append(_Target(endpoint, upstream))
    return targets


_Address = tuple[socket.AddressFamily, str]


async def _resolve(host: str) -> list[_Address]:
    """Every address of a host, once per scan (none when it does not resolve)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        log.warning("cannot resolve %s; its endpoints are skipped this scan", host)
        return []
    return list(dict.fromkeys((family, str(sockaddr[0])) for family, _, _, _, sockaddr in infos))


async def _port_open(addresses: list[_Address], port: int, timeout: float) -> bool:
    """Whether anything accepts on the port at one of the addresses (`localhost` may be
    ::1 first while a server listens on 127.0.0.1 only)."""
    loop = asyncio.get_running_loop()
    for family, ip in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (ip, port))
            return True
        except (OSError, TimeoutError):
            continue
        finally:
            sock.close()
    return False


async def _get_json(
    session: aiohttp.ClientSession, url: str, upstream: Upstream, timeout: float
) -> Any:
    """GET a bounded JSON document; None on any failure (a probe never raises)."""
    try:
        async with session.get(
            url,
            headers=upstream.auth_headers(),
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as resp:
            if resp.status != 200:
                return None
            if (resp.content_length or 0) > MAX_LISTING_BYTES:
                return None
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > MAX_LISTING_BYTES:
                    log.warning("model list at %s is over %d bytes; ignored", url, len(body))
                    return None
            return orjson.loads(body)
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, ValueError):
        return None


def _entries(listing: Any) -> list[dict[str, Any]] | None:
    data = listing.get("data") if isinstance(listing, dict) else listing
    if not isinstance(data, list):
        return None
    return [e for e in data if isinstance(e, dict) and isinstance(e.get("id"), str) and e["id"]]


async def _probe(
    session: aiohttp.ClientSession,
    target: _Target,
    timeout: float,
    addresses: dict[str, list[_Address]],
) -> list[FoundModel] | None:
    """The models one server offers, or None when no server answers there."""
    endpoint, upstream = target.endpoint, target.upstream
    if endpoint.models is not None:
        entries: list[dict[str, Any]] = [
            {"id": m, "object": "model", "owned_by": upstream.hostname} for m in endpoint.models
        ]
    else:
        hosts = addresses.get(upstream.hostname, [])
        if endpoint.url is None and not await _port_open(hosts, upstream.port, timeout):
            return None
        found = _entries(await _get_json(session, f"{upstream.base_url}/models", upstream, timeout))
        if found is None:
            return None
        entries = found
        # tabbyAPI lists every model on disk under /v1/models; /v1/model names the loaded one.
        loaded = await _get_json(session, f"{upstream.base_url}/model", upstream, timeout)
        if isinstance(loaded, dict) and isinstance(loaded.get("id"), str) and loaded["id"]:
            entries = [e for e in entries if e["id"] == loaded["id"]] or [loaded]

    models = [
        FoundModel(name, upstream, entry["id"], entry)
        for entry in entries
        for name in final_names(entry["id"], upstream.tags)
        if endpoint.filter is None or endpoint.filter in name
    ]
    log.debug(
        "found server %s with %d models",
        upstream.base_url,
        len(models),
        extra={"upstream": upstream.address, "models": [m.name for m in models]},
    )
    return models


async def scan(
    config: Config,
    session: aiohttp.ClientSession,
    previous: Registry | None = None,
    progress: ProgressCallback | None = None,
) -> ScanResult:
    """One discovery pass over every enabled endpoint."""
    started = time.perf_counter()
    targets = _targets(config.endpoints)
    # Resolve each scanned host once, not once per port.
    hosts = sorted({t.upstream.hostname for t in targets if t.endpoint.url is None})
    addresses = dict(zip(hosts, await asyncio.gather(*map(_resolve, hosts)), strict=True))
    limit = asyncio.Semaphore(SCAN_CONCURRENCY)
    done = 0

    async def bounded(target: _Target) -> list[FoundModel] | None:
        nonlocal done
        async with limit:
            result = await _probe(session, target, config.timeouts.scan, addresses)
        done += 1
        if progress is not None:
            progress(done, len(targets))
        return result

    results = await asyncio.gather(*(bounded(t) for t in targets))
    found = [model for models in results if models for model in models]
    servers = sum(1 for models in results if models is not None)
    registry = Registry.build(found, servers)
    old_names = set(previous.models) if previous is not None else set()
    new_names = set(registry.models)
    return ScanResult(
        registry=registry,
        duration_ms=(time.perf_counter() - started) * 1000,
        probed=len(targets),
        new=tuple(sorted(new_names - old_names)),
        gone=tuple(sorted(old_names - new_names)),
    )


def make_scan_session(config: Config) -> aiohttp.ClientSession:
    # Connections are not reused between scans: a server may restart in between.
    connector = aiohttp.TCPConnector(limit=SCAN_CONCURRENCY, force_close=True, ttl_dns_cache=60)
    return aiohttp.ClientSession(connector=connector, headers={"User-Agent": "llproxy-discovery"})


def log_scan(result: ScanResult) -> None:
    registry = result.registry
    log.info(
        "scan: %d servers, %d models, %d new, %d gone in %.0f ms",
        registry.servers,
        len(registry.models),
        len(result.new),
        len(result.gone),
        result.duration_ms,
        extra={
            "event": "scan",
            "servers": registry.servers,
            "models": len(registry.models),
            "new": list(result.new),
            "gone": list(result.gone),
            "duration_ms": round(result.duration_ms, 1),
        },
    )


class DiscoveryLoop:
    """Owns the periodic scan task and its HTTP session; hands every result to a callback."""

    def __init__(self, config: Config, publish: Callable[[ScanResult], None]) -> None:
        self.config = config
        self._publish = publish
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._running_scan: asyncio.Task[ScanResult] | None = None
        self._wake = asyncio.Event()
        self.registry = Registry()

    async def start(self) -> None:
        self._session = make_scan_session(self.config)
        self._task = asyncio.create_task(self._run(), name="llproxy-discovery")

    async def stop(self) -> None:
        for task in (self._task, self._running_scan):
            if task is not None:
                task.cancel()
        for task in (self._task, self._running_scan):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._session is not None:
            await self._session.close()

    def reconfigure(self, config: Config) -> None:
        """Use a new config from the next scan on, and start that scan now."""
        self.config = config
        self._wake.set()

    async def scan_now(self) -> ScanResult:
        """Run a scan, or join the one already running: scans never overlap."""
        if self._running_scan is None or self._running_scan.done():
            self._running_scan = asyncio.create_task(self._scan_and_publish())
        return await asyncio.shield(self._running_scan)

    async def _scan_and_publish(self) -> ScanResult:
        assert self._session is not None
        result = await scan(self.config, self._session, self.registry)
        self.registry = result.registry
        self._publish(result)
        log_scan(result)
        return result

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.scan_now()
            except Exception:
                log.exception("scan failed")
            try:
                async with asyncio.timeout(self.config.interval_ms / 1000):
                    await self._wake.wait()
            except TimeoutError:
                pass
