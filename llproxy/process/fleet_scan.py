"""One scan per interval for a fleet: the host that takes a Redis lock for the interval
scans and leaves its result in Redis; the others, whose endpoints are the same, take that
result instead of probing every range themselves. Secrets never go to Redis: each host
ties the result to its own upstreams by their URLs."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from typing import Any

import orjson
from redis.exceptions import RedisError

from ..backends.openai_http.discovery import ScanResult, ServerProblem, known_upstreams
from ..config import Config
from ..core.registry import Model, Registry, Replica
from ..stores.redis import redis_client

log = logging.getLogger("llproxy.discovery")

SCAN_LOCK = "llproxy:scan:lock"  # held for one interval by the host that scans it
SCAN_RESULT = "llproxy:scan:result"
# A result older than two intervals (and this) is no longer taken: its host stopped.
STALE_MARGIN_SECONDS = 5.0


def _turn(config: Config) -> int:
    """How long a scan stands for the fleet (ms): a little less than the interval, so the
    host that scanned finds the lock free when its own next scan is due."""
    return max(1, config.interval_ms * 9 // 10)


def fingerprint(config: Config) -> str:
    """What a scan depends on, without secrets: hosts whose endpoints differ scan alone."""
    endpoints = [
        {k: v for k, v in dataclasses.asdict(endpoint).items() if k != "apikey"}
        for endpoint in config.endpoints
    ]
    parts = {"endpoints": endpoints, "discovery": dataclasses.asdict(config.discovery)}
    return hashlib.sha256(orjson.dumps(parts, default=str)).hexdigest()


def encode_result(config: Config, result: ScanResult) -> bytes:
    registry = result.registry
    models = [
        {
            "name": model.name,
            "entry": model.entry,
            "context_length": model.context_length,
            "capabilities": model.capabilities,
            "replicas": [
                {
                    "base_url": r.upstream.base_url,
                    "upstream_id": r.upstream_id,
                    "backend": r.backend,
                    "instance": r.instance,
                }
                for r in model.replicas
            ],
        }
        for model in registry.models.values()
    ]
    return orjson.dumps(
        {
            "at": time.time(),
            "fingerprint": fingerprint(config),
            "models": models,
            "servers": registry.servers,
            "aliases": registry.aliases,
            "duration_ms": result.duration_ms,
            "probed": result.probed,
            "problems": [[p.address, p.reason] for p in result.problems],
            "listed": sorted(result.listed),
        },
        default=str,
    )


def decode_result(data: bytes | str, config: Config, previous: Registry) -> ScanResult | None:
    """The result for this host (its own upstreams, with their secrets), or None when it
    is stale, for other endpoints, or names an upstream this config does not."""
    document: dict[str, Any] = orjson.loads(data)
    stale_after = 2 * config.interval_ms / 1000 + STALE_MARGIN_SECONDS
    if document["fingerprint"] != fingerprint(config) or time.time() - document["at"] > stale_after:
        return None
    upstreams = known_upstreams(config)
    models: dict[str, Model] = {}
    for entry in document["models"]:
        replicas = []
        for replica in entry["replicas"]:
            upstream = upstreams.get(replica["base_url"])
            if upstream is None:
                return None
            # This host, seen through another llproxy of the fleet, is no replica of its own.
            if replica["instance"] and replica["instance"] == config.instance:
                continue
            replicas.append(
                Replica(upstream, replica["upstream_id"], replica["backend"], replica["instance"])
            )
        if replicas:
            models[entry["name"]] = Model(
                entry["name"],
                tuple(replicas),
                entry["entry"],
                entry["context_length"],
                tuple(entry["capabilities"]),
            )
    aliases = {alias: name for alias, name in document["aliases"].items() if name in models}
    registry = Registry(models, document["servers"], aliases)
    old, new = set(previous.models), set(registry.models)
    return ScanResult(
        registry=registry,
        duration_ms=document["duration_ms"],
        probed=document["probed"],
        new=tuple(sorted(new - old)),
        gone=tuple(sorted(old - new)),
        problems=tuple(ServerProblem(address, reason) for address, reason in document["problems"]),
        listed=frozenset(document["listed"]),
    )


class FleetScan:
    """The ScanShare of a host with `redis_url`."""

    def __init__(self, url: str) -> None:
        self.client = redis_client(url)

    async def shared(self, config: Config, previous: Registry) -> ScanResult | None:
        try:
            if await self.client.set(SCAN_LOCK, "1", nx=True, px=_turn(config)):
                return None  # this host scans this interval
            data = await self.client.get(SCAN_RESULT)
        except (RedisError, OSError) as exc:
            log.debug("no shared scan: %s", exc)
            return None
        if data is None:
            return None
        try:
            return decode_result(data, config, previous)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("the fleet's last scan cannot be read (%s): scanning here", exc)
            return None

    async def share(self, config: Config, result: ScanResult) -> None:
        try:
            # Its lock too: a host scanning out of turn (a forced scan, the first) spares
            # the others this interval's scan.
            await self.client.set(SCAN_LOCK, "1", px=_turn(config))
            ttl = int(2 * config.interval_ms + STALE_MARGIN_SECONDS * 1000)
            await self.client.set(SCAN_RESULT, encode_result(config, result), px=ttl)
        except (RedisError, OSError) as exc:
            log.debug("the scan is not shared: %s", exc)

    async def close(self) -> None:
        await self.client.aclose(close_connection_pool=True)


def fleet_scan(config: Config) -> FleetScan | None:
    """With `redis_url`, scans shared by the fleet."""
    return FleetScan(config.redis_url) if config.redis_url is not None else None
