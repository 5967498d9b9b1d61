"""Light probes of servers: one GET of a server's model listing says whether it is up
(any answer below 500 in time). A serving process probes the ejected replicas of `url`
endpoints when their ejection ends, so a recovered server (a cloud API) comes back
without a client's request as its trial; `llproxy scan` probes the servers whose models
the config names, which discovery never asks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

import aiohttp

from ..config import Config
from ..core.health import Health, Pass
from ..core.registry import Registry, Upstream
from .cloud import LISTING_PATHS
from .openai_http.discovery import make_scan_session


async def probe(session: aiohttp.ClientSession, upstream: Upstream, timeout: float) -> str | None:
    """None when the server answers its listing below 500 within `timeout` (a 401 or a
    404 is a server that is up all the same), else why not. The body is not read."""
    url = upstream.base_url + LISTING_PATHS.get(upstream.dialect, "/models")
    try:
        async with session.get(
            url,
            headers=upstream.auth_headers(),
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as resp:
            return f"HTTP {resp.status}" if resp.status >= 500 else None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except (aiohttp.ClientError, OSError) as exc:
        return str(exc) or type(exc).__name__


def url_endpoints(config: Config) -> frozenset[str]:
    """The base URLs of the enabled endpoints configured by `url` (the managed ones)."""
    return frozenset(e.url for e in config.endpoints if e.url is not None and e.enable)


class Probes:
    """Probes each ejected replica of a `url` endpoint when its ejection ends, one probe
    per server however many of its models are due; runs for the process's lifetime."""

    def __init__(self, config: Config, health: Health, registry: Callable[[], Registry]) -> None:
        self.urls = url_endpoints(config)
        self.timeout = config.timeouts.scan
        self.health = health
        self.registry = registry
        self.session: aiohttp.ClientSession | None = None
        self._config = config
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._probing: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """A replica was ejected: the schedule changed."""
        self._wake.set()

    def start(self) -> None:
        if self.urls:
            self.session = make_scan_session(self._config)
            self._task = asyncio.create_task(self._run(), name="llproxy-probes")

    async def close(self) -> None:
        for task in (self._task, *self._probing):
            if task is not None:
                task.cancel()
        for task in (self._task, *self._probing):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.session is not None:
            await self.session.close()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            watched = [
                (replica, model.name)
                for model in self.registry().models.values()
                for replica in model.replicas
                if replica.upstream.base_url in self.urls
            ]
            due, wait = self.health.due(watched)
            by_server: dict[Upstream, list[Pass]] = {}
            for granted in due:
                by_server.setdefault(granted.replica.upstream, []).append(granted)
            for upstream, passes in by_server.items():
                task = asyncio.create_task(self._probe(upstream, passes))
                self._probing.add(task)
                task.add_done_callback(self._probing.discard)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _probe(self, upstream: Upstream, passes: Sequence[Pass]) -> None:
        assert self.session is not None
        try:
            why = await probe(self.session, upstream, self.timeout)
        except BaseException:
            for granted in passes:
                self.health.abandoned(granted)
            raise
        for granted in passes:
            if why is None:
                self.health.succeeded(granted, probe=True)
            else:
                self.health.failed(granted, f"its probe failed: {why}")
        self.wake()  # their next trials, if they failed
