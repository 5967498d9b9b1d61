"""Discovery: probe every configured server for its models and build a Registry snapshot.

Ports of a range are first tried with a bare non-blocking connect, so a closed port costs
one refused SYN and no HTTP machinery; only open ports get `GET /v1/models`. Probes run
concurrently under a bound, with a short timeout and a cap on the response size. A server
that listed models before keeps them while its listing fails (slow, an error) for fewer
than `discovery.forget_after` scans in a row; a refused connection forgets them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson

from ...config import Config, Endpoint
from ...core.call import INSTANCE_HEADER, via_name
from ...core.encoding import BodyEncodingError, decode_body
from ...core.registry import FoundModel, Registry, Upstream, final_names
from ..cloud import CLOUD_LISTINGS, backend_of, dialect_field
from ..operator import operator_models

log = logging.getLogger("llproxy.discovery")

MAX_LISTING_BYTES = 4 * 1024 * 1024
SCAN_CONCURRENCY = 256

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class ServerProblem:
    """A server that answered but would not list its models, and why."""

    address: str
    reason: str

    def describe(self) -> str:
        auth = "HTTP 401" in self.reason or "HTTP 403" in self.reason
        return f"server {self.address} {self.reason}" + ("; check its apikey" if auth else "")


@dataclass(frozen=True, slots=True)
class ScanResult:
    registry: Registry
    duration_ms: float
    probed: int
    new: tuple[str, ...] = ()
    gone: tuple[str, ...] = ()
    problems: tuple[ServerProblem, ...] = ()
    listed: frozenset[str] = frozenset()  # the servers that listed their models this scan


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
                dialect=endpoint.dialect,
                redact=endpoint.redact,
            )
            targets.append(_Target(endpoint, upstream))
    return targets


def known_upstreams(config: Config) -> dict[str, Upstream]:
    """Every upstream the config names (its secrets included), by base URL: how a scan
    result made elsewhere is tied to this host's own upstreams."""
    upstreams = {target.upstream.base_url: target.upstream for target in _targets(config.endpoints)}
    upstreams.update((m.upstream.base_url, m.upstream) for m in operator_models(config.endpoints))
    return upstreams


_Address = tuple[socket.AddressFamily, str]


async def _resolve(host: str) -> list[_Address]:
    """Every address of a host, once per scan (none when it does not resolve)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        log.warning("cannot resolve %s; its endpoints are skipped this scan", host)
        return []
    return list(dict.fromkeys((family, str(sockaddr[0])) for family, _, _, _, sockaddr in infos))


async def _port_open(addresses: list[_Address], port: int, timeout: float) -> bool | None:
    """Whether anything accepts on the port at one of the addresses (`localhost` may be
    ::1 first while a server listens on 127.0.0.1 only): None when no address refused
    but none accepted in time either (a server whose accept queue is full under load
    drops the SYN: that is no proof it is gone)."""
    loop = asyncio.get_running_loop()
    silent = False
    for family, ip in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (ip, port))
            return True
        except TimeoutError:
            silent = True
        except OSError:
            continue
        finally:
            sock.close()
    return None if silent else False


class _Refused(Exception):
    """A server answered a listing request with something other than a model list."""


class _Itself(_Refused):
    """The server is this very llproxy (it may listen on a port it scans)."""


class _Unreachable(_Refused):
    """Nothing accepted the connection: the server is gone, not slow."""


@dataclass(frozen=True, slots=True)
class _Document:
    body: Any
    instance: str  # the llproxy that answered, if one did (its X-Llproxy-Instance)


async def _get_json(
    session: aiohttp.ClientSession, url: str, upstream: Upstream, timeout: float
) -> Any:
    return (await _get(session, url, upstream, timeout)).body


async def _get(
    session: aiohttp.ClientSession,
    url: str,
    upstream: Upstream,
    timeout: float,
    itself: str = "",
) -> _Document:
    """GET a bounded JSON document; _Refused says why there is none (a probe never raises
    anything else)."""
    try:
        async with session.get(
            url,
            headers=upstream.auth_headers(),
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as resp:
            if itself and resp.headers.get(INSTANCE_HEADER) == itself:
                raise _Itself("this llproxy")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > MAX_LISTING_BYTES:
                    raise _Refused(f"its answer is over {MAX_LISTING_BYTES} bytes")
            decoded = decode_body(
                bytes(body), resp.headers.get("Content-Encoding"), MAX_LISTING_BYTES, 100
            )
            if resp.status != 200:
                raise _Refused(f"HTTP {resp.status} {resp.reason or ''}".strip() + _said(decoded))
            return _Document(orjson.loads(decoded), resp.headers.get(INSTANCE_HEADER, ""))
    except aiohttp.ClientConnectorError as exc:
        raise _Unreachable(str(exc) or type(exc).__name__) from None
    except BodyEncodingError as exc:
        raise _Refused(str(exc)) from None
    except orjson.JSONDecodeError:
        raise _Refused("its answer is not JSON") from None
    except TimeoutError:
        raise _Refused(f"no answer within {timeout:g} s") from None
    except (aiohttp.ClientError, ValueError) as exc:
        raise _Refused(str(exc) or type(exc).__name__) from None


def _said(body: bytes) -> str:
    """What an error answer says, short: its OpenAI-shaped message, else its first line."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    message: Any = None
    if isinstance(document, dict):
        error = document.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or document.get("message") or document.get("detail")
    if not isinstance(message, str):
        message = body[:200].decode("utf-8", "replace").strip().splitlines()[:1]
        message = message[0] if message else ""
    return f": {message[:200]}" if message else ""


def _entries(listing: Any) -> list[dict[str, Any]] | None:
    data = listing.get("data") if isinstance(listing, dict) else listing
    if not isinstance(data, list):
        return None
    return [e for e in data if isinstance(e, dict) and _usable_id(e.get("id"))]


MAX_MODEL_ID = 512


def _usable_id(value: Any) -> bool:
    """A model id llproxy can name, send and log: text without control characters."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_MODEL_ID
        and not any(ord(char) < 0x20 or ord(char) == 0x7F for char in value)
    )


@dataclass(frozen=True, slots=True)
class _Listed:
    """A server's models; `partial` when its /props did not answer, so the context and
    abilities it tells were not all known this scan."""

    models: list[FoundModel]
    partial: bool = False


@dataclass(frozen=True, slots=True)
class _Failed:
    """A server that did not list its models this scan, though it may still be there."""

    reason: str
    told: bool  # worth a ServerProblem even when it never listed anything
    gone: bool = False  # it refused the connection: what it listed before is forgotten


async def _probe(
    session: aiohttp.ClientSession,
    target: _Target,
    timeout: float,
    addresses: dict[str, list[_Address]],
    itself: str = "",
) -> _Listed | _Failed | None:
    """The models one server offers; _Failed when it would not list them (`told` when that
    is worth telling even of a server that never listed any: a configured URL, or one that
    refused the credentials); None when nothing is there (the port refuses connections)."""
    endpoint, upstream = target.endpoint, target.upstream
    instance = ""
    if endpoint.models is not None:
        entries: list[dict[str, Any]] = [
            {"id": m, "object": "model", "owned_by": upstream.hostname} | dialect_field(upstream)
            for m in endpoint.models
        ]
    elif (cloud_listing := CLOUD_LISTINGS.get(endpoint.dialect)) is not None:
        try:
            entries = await cloud_listing(partial(_get_json, session), upstream, timeout)
        except (_Refused, ValueError) as exc:
            return _Failed(f"refused the model list: {exc}", True, isinstance(exc, _Unreachable))
    else:
        hosts = addresses.get(upstream.hostname, [])
        if endpoint.url is None:
            opened = await _port_open(hosts, upstream.port, timeout)
            if opened is None:
                return _Failed(f"its port accepted nothing within {timeout:g} s", False)
            if not opened:
                return None
        try:
            listing = await _get(session, f"{upstream.base_url}/models", upstream, timeout, itself)
        except _Itself:
            return None
        except _Refused as exc:
            reason = str(exc)
            told = endpoint.url is not None or reason.startswith(("HTTP 401", "HTTP 403"))
            return _Failed(f"refused the model list: {reason}", told, isinstance(exc, _Unreachable))
        found = _entries(listing.body)
        if found is None:
            return _Failed("its model list is not OpenAI-shaped", endpoint.url is not None)
        entries, instance = found, listing.instance
        # tabbyAPI lists every model on disk under /v1/models; /v1/model names the loaded one.
        try:
            loaded = await _get_json(session, f"{upstream.base_url}/model", upstream, timeout)
        except _Refused:
            loaded = None
        if isinstance(loaded, dict) and _usable_id(loaded.get("id")):
            entries = [e for e in entries if e["id"] == loaded["id"]] or [loaded]

    server = await _llama_props(session, upstream, timeout) if _llama(entries) else {}
    models = [
        FoundModel(
            name,
            upstream,
            entry["id"],
            entry,
            *_abilities(entry, server or {}),
            instance=instance,
            aliases=_aliases(entry, upstream.tags),
            backend=backend_of(upstream),
            think_open=opens_thinking(server or {}),
        )
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
    return _Listed(models, server is None)


def _aliases(entry: dict[str, Any], tags: Sequence[str]) -> tuple[str, ...]:
    """The final names of the other names a server lists for a model (llama.cpp's
    `aliases`, from `--alias`), which it answers by too."""
    listed = entry.get("aliases")
    if not isinstance(listed, list):
        return ()
    names = (n for alias in listed if _usable_id(alias) for n in final_names(alias, tags))
    return tuple(dict.fromkeys(names))


def _llama(entries: list[dict[str, Any]]) -> bool:
    """llama.cpp's listing carries each model's `meta`; its /props says more."""
    return any(isinstance(entry.get("meta"), dict) for entry in entries)


async def _llama_props(
    session: aiohttp.ClientSession, upstream: Upstream, timeout: float
) -> dict[str, Any] | None:
    """llama.cpp's /props (at the server's root): context per slot, template abilities;
    None when it did not answer (a busy server may be slow to)."""
    root = upstream.base_url.removesuffix("/v1")
    try:
        props = await _get_json(session, f"{root}/props", upstream, timeout)
    except _Refused:
        return None
    return props if isinstance(props, dict) else {}


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _abilities(entry: dict[str, Any], props: dict[str, Any]) -> tuple[int | None, tuple[str, ...]]:
    """A model's context length and capabilities, from what its server reports: vLLM's
    `max_model_len`, a `context_length`, llama.cpp's n_ctx (per slot) or its training
    context; llama.cpp's template abilities and modalities."""
    settings = props.get("default_generation_settings")
    meta = entry.get("meta")
    context = (
        _positive(entry.get("max_model_len"))
        or _positive(entry.get("context_length"))
        or (_positive(settings.get("n_ctx")) if isinstance(settings, dict) else None)
        or (_positive(meta.get("n_ctx_train")) if isinstance(meta, dict) else None)
    )
    capabilities = []
    caps = props.get("chat_template_caps")
    if isinstance(caps, dict) and caps.get("supports_tools") is True:
        capabilities.append("tools")
    modalities = props.get("modalities")
    if isinstance(modalities, dict) and modalities.get("vision") is True:
        capabilities.append("vision")
    return context, tuple(capabilities)


def opens_thinking(props: dict[str, Any]) -> bool:
    """Whether llama.cpp's chat template ends the generation prompt inside an open
    `<think>` (Qwen3 thinking, DeepSeek-R1): the text after its last
    `add_generation_prompt` up to the `endif` opens the block and does not close it (as
    Qwen3's `enable_thinking` false branch does)."""
    template = props.get("chat_template")
    if not isinstance(template, str) or "add_generation_prompt" not in template:
        return False
    tail = template.rsplit("add_generation_prompt", 1)[1].split("endif", 1)[0]
    return "<think>" in tail and "</think>" not in tail


class ScanMemory:
    """What each server listed at its last good scan, and how many scans in a row have
    failed to list its models since: kept by whoever scans again and again."""

    def __init__(self) -> None:
        self.found: dict[_Target, list[FoundModel]] = {}
        self.failures: dict[_Target, int] = {}

    def listed(self, target: _Target, listed: _Listed) -> list[FoundModel]:
        """A server's models; where its /props did not answer, each keeps the context
        and abilities it had last (else a busy llama.cpp's models would fall back to
        their training context, far above what a slot holds)."""
        models = listed.models
        if listed.partial and (before := self.found.get(target)):
            known = {(m.name, m.upstream_id): m for m in before}
            models = [
                replace(
                    m,
                    context_length=old.context_length,
                    capabilities=old.capabilities,
                    think_open=old.think_open,
                )
                if (old := known.get((m.name, m.upstream_id))) is not None
                else m
                for m in models
            ]
        self.found[target] = models
        self.failures.pop(target, None)
        return models

    def forget(self, target: _Target) -> None:
        self.found.pop(target, None)
        self.failures.pop(target, None)

    def failed(self, target: _Target, forget_after: int) -> list[FoundModel]:
        """The models a server keeps through this failed scan (none once it has failed
        `forget_after` in a row)."""
        failures = self.failures.get(target, 0) + 1
        if failures >= forget_after or target not in self.found:
            self.forget(target)
            return []
        self.failures[target] = failures
        return self.found[target]

    def keep_only(self, targets: Sequence[_Target]) -> None:
        """Drop what servers no longer configured listed."""
        for target in self.found.keys() - set(targets):
            self.forget(target)


def _remembered(
    target: _Target,
    result: _Listed | _Failed | None,
    memory: ScanMemory | None,
    forget_after: int,
) -> tuple[list[FoundModel] | None, ServerProblem | None]:
    """A probe's models (None when no server counts as there) and the problem worth
    telling, once the server's earlier listings are taken into account."""
    address = target.upstream.base_url
    if isinstance(result, _Listed):
        return (result.models if memory is None else memory.listed(target, result)), None
    if result is None or result.gone:
        if memory is not None:
            memory.forget(target)
        return None, ServerProblem(address, result.reason) if result and result.told else None
    kept = memory.failed(target, forget_after) if memory is not None else []
    if kept:
        reason = (
            f"did not list its models ({result.reason}); they are kept until "
            f"{forget_after} scans in a row fail"
        )
        return kept, ServerProblem(address, reason)
    return None, ServerProblem(address, result.reason) if result.told else None


async def scan(
    config: Config,
    session: aiohttp.ClientSession,
    previous: Registry | None = None,
    progress: ProgressCallback | None = None,
    memory: ScanMemory | None = None,
) -> ScanResult:
    """One discovery pass over every enabled endpoint; with a memory (of the scans
    before), a server whose listing fails keeps what it listed last, for a while."""
    started = time.perf_counter()
    targets = _targets(config.endpoints)
    # Resolve each scanned host once, not once per port.
    hosts = sorted({t.upstream.hostname for t in targets if t.endpoint.url is None})
    addresses = dict(zip(hosts, await asyncio.gather(*map(_resolve, hosts)), strict=True))
    limit = asyncio.Semaphore(SCAN_CONCURRENCY)
    done = 0

    async def bounded(target: _Target) -> _Listed | _Failed | None:
        nonlocal done
        async with limit:
            result = await _probe(session, target, config.timeouts.scan, addresses, config.instance)
        done += 1
        if progress is not None:
            progress(done, len(targets))
        return result

    probed = await asyncio.gather(*(bounded(t) for t in targets))
    if memory is not None:
        memory.keep_only(targets)
    forget_after = config.discovery.forget_after
    results = [
        _remembered(target, result, memory, forget_after)
        for target, result in zip(targets, probed, strict=True)
    ]
    found = [model for models, _ in results if models is not None for model in models]
    found += operator_models(config.endpoints)
    servers = sum(1 for models, _ in results if models is not None)
    registry = Registry.build(found, servers)
    old_names = set(previous.models) if previous is not None else set()
    new_names = set(registry.models)
    return ScanResult(
        registry=registry,
        duration_ms=(time.perf_counter() - started) * 1000,
        probed=len(targets),
        new=tuple(sorted(new_names - old_names)),
        gone=tuple(sorted(old_names - new_names)),
        problems=tuple(problem for _, problem in results if problem is not None),
        listed=frozenset(
            t.upstream.base_url
            for t, p in zip(targets, probed, strict=True)
            if isinstance(p, _Listed)
        ),
    )


def make_scan_session(config: Config) -> aiohttp.ClientSession:
    # Connections are not reused between scans: a server may restart in between.
    connector = aiohttp.TCPConnector(limit=SCAN_CONCURRENCY, force_close=True, ttl_dns_cache=60)
    headers = {"User-Agent": "llproxy-discovery", "Accept-Encoding": "identity"}
    if config.instance:
        # Another llproxy then lists only what it does not see through this one.
        headers["Via"] = f"1.1 {via_name(config.instance)}"
    # Listings are decoded here, within their bound: aiohttp would inflate any size.
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, headers=headers)


class ScanLog:
    """What scans tell the log: the first scan's summary, then only what changed (models
    found or gone, by name; servers that refuse or recover; a default model that is
    missing), so a short scan interval does not flood it."""

    def __init__(self) -> None:
        self.first = True
        self.problems: dict[str, str] = {}
        self.missing: frozenset[str] = frozenset()

    def report(self, result: ScanResult, config: Config) -> None:
        registry = result.registry
        fields = {
            "event": "scan",
            "servers": registry.servers,
            "models": len(registry.models),
            "new": list(result.new),
            "gone": list(result.gone),
            "duration_ms": round(result.duration_ms, 1),
        }
        if self.first:
            log.info(
                "scan: %d servers, %d models in %.0f ms",
                registry.servers,
                len(registry.models),
                result.duration_ms,
                extra=fields,
            )
        elif result.new or result.gone:
            changes = [f"new {', '.join(result.new)}"] if result.new else []
            changes += [f"gone {', '.join(result.gone)}"] if result.gone else []
            log.info(
                "scan: %s (now %d servers, %d models)",
                "; ".join(changes),
                registry.servers,
                len(registry.models),
                extra=fields,
            )
        self._report_problems(result.problems, result.listed)
        self._report_missing(config, registry)
        self.first = False

    def _report_problems(self, problems: Sequence[ServerProblem], listed: frozenset[str]) -> None:
        now = {problem.address: problem.reason for problem in problems}
        for problem in problems:
            if self.problems.get(problem.address) != problem.reason:
                log.warning(
                    "%s",
                    problem.describe(),
                    extra={
                        "event": "server_problem",
                        "server": problem.address,
                        "reason": problem.reason,
                    },
                )
        for address in self.problems.keys() - now.keys():
            if address in listed:  # else it is gone, or its models were forgotten
                log.info("server %s answers again", address)
        self.problems = now

    def _report_missing(self, config: Config, registry: Registry) -> None:
        missing = frozenset(missing_models(config, registry))
        for name in sorted(missing - self.missing):
            log.warning(
                "%s is not among the %d models found",
                name,
                len(registry.models),
                extra={"event": "model_missing", "model": name},
            )
        for name in sorted(self.missing - missing):
            log.info("%s is available now", name)
        self.missing = missing


def missing_models(config: Config, registry: Registry) -> list[str]:
    """The models the config names that the registry lacks, each described."""
    missing = []
    if config.default_model is not None and config.default_model not in registry.models:
        missing.append(f"default_model '{config.default_model}'")
    for alias, chain in config.aliases:
        missing.extend(
            f"the target '{target}' of alias '{alias}'"
            for target in chain
            if target not in registry.models
        )
    return missing


class ScanShare(Protocol):
    """Scans shared by several hosts (a fleet): one scans an interval, the others take
    its result."""

    async def shared(self, config: Config, previous: Registry) -> ScanResult | None:
        """Another host's recent scan for this config, or None: scan here."""

    async def share(self, config: Config, result: ScanResult) -> None: ...

    async def close(self) -> None: ...


class DiscoveryLoop:
    """Owns the periodic scan task and its HTTP session; hands every result to a callback."""

    def __init__(
        self,
        config: Config,
        publish: Callable[[ScanResult], None],
        share: ScanShare | None = None,
    ) -> None:
        self.config = config
        self._publish = publish
        self.share = share
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._running_scan: asyncio.Task[ScanResult] | None = None
        self._wake = asyncio.Event()
        self.registry = Registry()
        self._memory = ScanMemory()
        self._log = ScanLog()

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
        if self.share is not None:
            await self.share.close()

    def reconfigure(self, config: Config) -> None:
        """Use a new config from the next scan on, and start that scan now."""
        self.config = config
        self._wake.set()

    async def scan_now(self, force: bool = False) -> ScanResult:
        """Run a scan, or join the one already running: scans never overlap. Unless
        forced, another host's recent scan may stand in for it (a ScanShare)."""
        if self._running_scan is None or self._running_scan.done():
            self._running_scan = asyncio.create_task(self._scan_and_publish(force))
        return await asyncio.shield(self._running_scan)

    async def _scan_and_publish(self, force: bool) -> ScanResult:
        assert self._session is not None
        share = self.share
        result = None if share is None or force else await share.shared(self.config, self.registry)
        if result is None:
            result = await scan(self.config, self._session, self.registry, memory=self._memory)
            if share is not None:
                await share.share(self.config, result)
        self.registry = result.registry
        self._publish(result)
        self._log.report(result, self.config)
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
