"""The master process: binds the listening sockets, runs discovery, supervises workers.

Control plane here, data plane in the workers. Signal handlers and console commands only
put an event on one queue; one dispatcher runs the matching `handle_*`. TERM/INT/quit
drain gracefully (a second INT forces), HUP reloads the config with a rolling restart of
the workers, TTIN/TTOU change their number, and a worker that dies is replaced at once,
unless it died before ever serving, which stops the daemon instead of a respawn loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

import uvloop

from ..backends.openai_http.discovery import DiscoveryLoop, ScanResult
from ..config import Config, ConfigError
from ..core.registry import Registry
from ..stores import HostShare, describe_stores
from .channel import (
    Calls,
    Channel,
    DeskAttach,
    DeskCommand,
    DeskDetach,
    DeskSubmit,
    DeskWithdraw,
    MetricsRequest,
    RateLimitRequest,
    Ready,
    RegistryUpdate,
    StatsReply,
    UsageBatch,
    WorkerCount,
    WorkerSpec,
)
from .fleet_scan import fleet_scan
from .listeners import Listeners
from .preflight import missing_library
from .sdnotify import Notifier
from .services import MasterServices
from .worker import worker_main

log = logging.getLogger("llproxy.supervisor")

EX_BOOT_FAILURE = 3
EX_SOFTWARE = 70  # sysexits: the master itself failed
# A service loop of the master that fails is started again after RESTART_DELAY; one that
# fails RESTART_LIMIT times within RESTART_WINDOW seconds stops the daemon instead.
RESTART_DELAY = 1.0
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
# How often worker numbers are fetched, so a crashed worker's counts are mostly kept.
TELEMETRY_POLL = 5.0
EX_BIND_FAILURE = 4
BOOT_TIMEOUT = 60.0
# After the graceful period the workers get this long to exit before SIGKILL.
KILL_MARGIN = 5.0


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@dataclass
class ServeOptions:
    """Everything `llproxy serve` was told; `load_config` re-reads the file for SIGHUP."""

    load_config: Callable[[], Config]
    workers: int | None = None
    verbose: int = 0
    log_format: str = "text"
    graceful_timeout: float = 30.0
    console: bool = False


@dataclass
class WorkerHandle:
    worker_id: int
    process: BaseProcess
    channel: Channel
    calls: Calls
    started: float = field(default_factory=time.monotonic)
    ready: asyncio.Future[None] | None = None
    retiring: bool = False
    slot: int = 0  # which listening socket it accepts on (see listeners.py)

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    @property
    def started_serving(self) -> bool:
        ready = self.ready
        if ready is None or not ready.done() or ready.cancelled():
            return False
        return ready.exception() is None


class Supervisor:
    def __init__(self, options: ServeOptions, config: Config, listeners: Listeners) -> None:
        self.options = options
        self.config = config
        self.listeners = listeners
        self.target = options.workers or config.workers or default_workers()
        self.workers: dict[int, WorkerHandle] = {}
        self.registry = Registry()
        self.events: asyncio.Queue[str] = asyncio.Queue()
        self._all_exited = asyncio.Event()
        self.notifier = Notifier()
        self.exit_code = 0
        self._ids = itertools.count(1)
        self._context = multiprocessing.get_context("spawn")
        self._stopping: asyncio.Task[None] | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._critical: set[asyncio.Task[Any]] = set()
        self.restart_delay = RESTART_DELAY
        self._done: asyncio.Future[None] | None = None
        self.console: Any = None
        # The host's rate table, mapped by every worker; made before any worker exists.
        self.host = HostShare.create(self._context)
        self.services = MasterServices(config)
        self.services.desk.exists = self._model_exists
        self.discovery = DiscoveryLoop(config, self.publish, fleet_scan(config))

    # --- workers -----------------------------------------------------------------------

    def spawn(self, config: Config, slot: int) -> WorkerHandle:
        worker_id = next(self._ids)
        sock = self.listeners.listener(slot)
        parent_end, child_end = socket.socketpair()
        spec = WorkerSpec(
            worker_id=worker_id,
            config=config,
            sock=sock,
            channel=child_end,
            host=self.host,
            verbose=self.options.verbose,
            log_format=self.options.log_format,
            graceful_timeout=self.options.graceful_timeout,
        )
        process = self._context.Process(
            target=worker_main, args=(spec,), name=f"llproxy-worker-{worker_id}", daemon=False
        )
        process.start()
        child_end.close()
        channel = Channel(parent_end, lambda message: self._on_message(handle, message))
        handle = WorkerHandle(worker_id, process, channel, Calls(channel), slot=slot)
        self.workers[worker_id] = handle
        self._all_exited.clear()
        return handle

    async def _watch(self, handle: WorkerHandle) -> None:
        """Start listening to a spawned worker; needs the running loop."""
        loop = asyncio.get_running_loop()
        handle.ready = loop.create_future()
        await handle.channel.attach()
        loop.add_reader(handle.process.sentinel, self._on_exit, handle)
        handle.channel.send(RegistryUpdate(self.registry))
        handle.channel.send(WorkerCount(self.target))

    def _on_message(self, sender: WorkerHandle, message: Any) -> None:
        match message:
            case Ready(worker_id, pid):
                if sender.ready is not None and not sender.ready.done():
                    sender.ready.set_result(None)
                    log.debug("worker %d (pid %d) serving", worker_id, pid)
            case UsageBatch(records):
                self.services.usage.add(records)
            case MetricsRequest(token):
                self._own(self._answer(sender, self.services.metrics(token, self._calls())))
            case RateLimitRequest(token, limit, client):
                self._own(self._answer(sender, self.services.count(token, limit, client)))
            case StatsReply(0, worker_id, _, telemetry):  # the last word of an exiting worker
                self.services.last_seen[worker_id] = telemetry
            case StatsReply():
                sender.calls.resolve(message)
            case DeskSubmit() | DeskWithdraw() | DeskAttach() | DeskDetach() | DeskCommand():
                self.services.desks.handle(sender.worker_id, sender.channel.send, message)

    def _calls(self) -> list[tuple[int, Calls]]:
        # A worker still starting cannot answer yet; asking it would only time out.
        return [(h.worker_id, h.calls) for h in self._serving() if h.started_serving]

    async def _answer(self, handle: WorkerHandle, reply: Awaitable[Any]) -> None:
        handle.channel.send(await reply)

    def _on_exit(self, handle: WorkerHandle) -> None:
        asyncio.get_running_loop().remove_reader(handle.process.sentinel)
        self._own(self._reap(handle), critical=True).set_name(f"reap-worker-{handle.worker_id}")

    async def _reap(self, handle: WorkerHandle) -> None:
        # The sentinel closes an instant before the child can be reaped.
        handle.process.join(1.0)
        # Its last usage records and numbers may still be on the way.
        await handle.channel.closed(timeout=2.0)
        self.workers.pop(handle.worker_id, None)
        if not self.workers:
            self._all_exited.set()
        self.services.worker_exited(handle.worker_id)
        self.services.desks.worker_gone(handle.worker_id)
        code = handle.process.exitcode
        how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
        served = handle.started_serving
        if handle.ready is not None and not handle.ready.done():
            handle.ready.set_exception(RuntimeError(f"worker {handle.worker_id} died: {how}"))
            handle.ready.exception()  # retrieved here; boot waiters look at it themselves
        if handle.retiring or self._stopping is not None:
            log.debug("worker %d (pid %d) exited: %s", handle.worker_id, handle.pid, how)
            return
        reloading = self._reloading is not None and not self._reloading.done()
        if not served and not reloading:
            log.error(
                "worker %d (pid %d) failed before serving (%s); stopping llproxy",
                handle.worker_id,
                handle.pid,
                how,
            )
            self.exit_code = EX_BOOT_FAILURE
            self.events.put_nowait("TERM")
            return
        if served:
            log.warning(
                "worker %d (pid %d) died (%s); starting a new one",
                handle.worker_id,
                handle.pid,
                how,
            )
            self._own(self._start_workers(1, self.config))

    async def _start_workers(
        self, count: int, config: Config, slots: Iterable[int] | None = None
    ) -> list[WorkerHandle]:
        """Spawn `count` workers (on `slots`, else on slots no serving worker holds) and
        wait until each serves; raises if one fails to boot."""
        if slots is None:
            slots = self.listeners.free({h.slot for h in self._serving()}, count)
        handles = [self.spawn(config, slot) for slot in slots]
        for handle in handles:
            await self._watch(handle)
        try:
            async with asyncio.timeout(BOOT_TIMEOUT):
                await asyncio.gather(*(h.ready for h in handles if h.ready is not None))
        except BaseException:
            for handle in handles:
                self._retire(handle, signal.SIGKILL)
            self._close_unheld_slots()
            raise
        self._broadcast(WorkerCount(self.target))
        return handles

    def _retire(self, handle: WorkerHandle, sig: signal.Signals = signal.SIGTERM) -> None:
        handle.retiring = True
        with contextlib.suppress(ProcessLookupError):
            if handle.process.pid is not None and handle.process.exitcode is None:
                os.kill(handle.process.pid, sig)

    def _serving(self) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if not h.retiring]

    def _close_unheld_slots(self) -> None:
        self.listeners.keep_only({h.slot for h in self._serving()})

    def _broadcast(self, message: RegistryUpdate | WorkerCount) -> None:
        for handle in list(self.workers.values()):
            handle.channel.send(message)

    def _model_exists(self, name: str) -> bool:
        """Whether an operator may hand off to this name (a model or an alias of one)."""
        if name in self.registry.models:
            return True
        chain = dict(self.config.aliases).get(name, ())
        return any(target in self.registry.models for target in chain)

    def publish(self, result: ScanResult) -> None:
        self.registry = result.registry
        self.services.discovery_telemetry.record(result)
        self._broadcast(RegistryUpdate(result.registry))

    async def collect_stats(self) -> list[StatsReply]:
        return await self.services.stats(self._calls())

    async def _poll_telemetry(self) -> None:
        while True:
            await asyncio.sleep(TELEMETRY_POLL)
            await self.collect_stats()

    def _own(self, coro: Any, critical: bool = False) -> asyncio.Task[Any]:
        """Run a task the supervisor keeps; one whose failure leaves the master unable to
        do its job (reaping a worker, shutting down) is `critical`: it stops the daemon."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        if critical:
            self._critical.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        critical = task in self._critical
        self._critical.discard(task)
        if task.cancelled() or (error := task.exception()) is None:
            return
        log.error("supervisor task %s failed", task.get_name(), exc_info=error)
        if critical:
            self._fail(f"supervisor task {task.get_name()} failed: {error!r}")

    def _fail(self, why: str) -> None:
        """The master cannot go on as it should: stop loudly, with a non-zero exit."""
        log.critical("%s; stopping llproxy", why)
        self.exit_code = self.exit_code or EX_SOFTWARE
        if self._stopping is None:
            self.enqueue("TERM")
        elif self._stopping.done() and self._done is not None and not self._done.done():
            self._done.set_result(None)  # the shutdown itself failed: end here

    def _keep(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a service loop for the master's lifetime, started again when it fails."""

        async def run() -> None:
            failures: list[float] = []
            while True:
                try:
                    await loop()
                    return
                except Exception:
                    now = time.monotonic()
                    failures = [t for t in failures if now - t < RESTART_WINDOW] + [now]
                    log.exception("%s failed (%d in %g s)", name, len(failures), RESTART_WINDOW)
                    if len(failures) >= RESTART_LIMIT:
                        self._fail(f"{name} keeps failing")
                        return
                await asyncio.sleep(self.restart_delay)

        task = self._own(run())
        task.set_name(name)

    # --- the one dispatcher ------------------------------------------------------------

    def enqueue(self, event: str) -> None:
        self.events.put_nowait(event)

    async def dispatch(self) -> None:
        """The one place events are handled; runs until main() cancels it."""
        while True:
            event = await self.events.get()
            handler = getattr(self, f"handle_{event.lower()}", None)
            if handler is None:
                log.warning("unknown event %s", event)
                continue
            try:
                await handler()
            except Exception:
                log.exception("handling %s failed", event)

    async def handle_term(self) -> None:
        if self._stopping is None:
            self._stopping = self._own(self._shutdown(), critical=True)
            self._stopping.set_name("shutdown")

    async def handle_int(self) -> None:
        if self._stopping is not None:
            log.warning("second interrupt: stopping now")
            for handle in self.workers.values():
                self._retire(handle, signal.SIGKILL)
            self.exit_code = self.exit_code or 1
            assert self._done is not None
            if not self._done.done():
                self._done.set_result(None)
            return
        log.info("interrupted: finishing requests in flight (again to force)")
        await self.handle_term()

    handle_quit = handle_term
    handle_exit = handle_term

    async def handle_hup(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            log.warning("a reload is already running")
            return
        self._reloading = self._own(self._reload())

    handle_reload = handle_hup

    async def handle_ttin(self) -> None:
        self.target += 1
        log.info("adding a worker (now %d)", self.target)
        self._own(self._start_workers(1, self.config))

    async def handle_ttou(self) -> None:
        serving = self._serving()
        if self.target <= 1 or not serving:
            log.warning("keeping the last worker")
            return
        self.target -= 1
        newest = max(serving, key=lambda h: h.worker_id)
        log.info("retiring worker %d (now %d)", newest.worker_id, self.target)
        self._retire(newest)
        self._close_unheld_slots()
        self._broadcast(WorkerCount(self.target))

    async def handle_scan(self) -> None:
        self._own(self.discovery.scan_now(force=True))

    async def handle_models(self) -> None:
        # Replica health is each worker's own: asked of them now, with their numbers.
        async def show() -> None:
            self.console.show_models(self.registry, await self.collect_stats())

        self._own(show())

    async def handle_workers(self) -> None:
        self.console.show_workers(list(self.workers.values()))

    async def handle_stats(self) -> None:
        async def show() -> None:
            self.console.show_stats(await self.collect_stats())

        self._own(show())

    async def handle_stores(self) -> None:
        async def show() -> None:
            replies = await self.collect_stats()
            self.console.show_stores(self.services.stores(replies))

        self._own(show())

    async def handle_clear(self) -> None:
        self.console.clear()

    async def handle_help(self) -> None:
        self.console.show_help()

    # --- reload and shutdown ------------------------------------------------------------

    async def _reload(self) -> None:
        self.notifier.reloading()
        try:
            try:
                config = self.options.load_config()
            except ConfigError as exc:
                log.error("reload: configuration error, keeping the old one: %s", exc)
                return
            listening = (self.config.bindip, self.config.port, self.config.reuse_port)
            if (config.bindip, config.port, config.reuse_port) != listening:
                log.warning(
                    "reload: bindip/port/reuse_port changes need a restart; still on %s:%d",
                    self.config.bindip,
                    self.config.port,
                )
                config = dataclasses.replace(
                    config, bindip=listening[0], port=listening[1], reuse_port=listening[2]
                )
            if config.database_url != self.config.database_url:
                # The master's usage writer keeps its database: the workers' keys must too.
                log.warning("reload: a database_url change needs a restart; keeping the old one")
                config = dataclasses.replace(config, database_url=self.config.database_url)
            old = self._serving()
            target = self.target
            if self.options.workers is None and config.workers is not None:
                target = config.workers
            try:
                # Each new worker takes over an old one's slot, so the old one's queued
                # connections stay queued for it instead of being reset.
                await self._start_workers(target, config, range(target))
            except Exception as exc:
                log.error("reload: new workers failed to start (%s); keeping the old ones", exc)
                return
            # The new workers serve: only now does the new config become the current one.
            self.target = target
            self.config = config
            self.discovery.reconfigure(config)
            for handle in old:
                self._retire(handle)
            self._close_unheld_slots()
            self._broadcast(WorkerCount(self.target))
            log.info("reloaded %s: %d workers", config.source, self.target)
        finally:
            self.notifier.ready(f"serving {len(self.registry.models)} models")

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        # The workers stop accepting; once the master's copies of the listening sockets
        # are closed too, a new connection is refused at once instead of waiting in the
        # queue of a socket nobody accepts on.
        self.listeners.close()
        log.info(
            "shutting down: finishing requests in flight (up to %g s)",
            self.options.graceful_timeout,
        )
        if self.console is not None:
            self.console.stop()
        for handle in list(self.workers.values()):
            self._retire(handle)
        try:
            async with asyncio.timeout(self.options.graceful_timeout + KILL_MARGIN):
                await self._all_exited.wait()
        except TimeoutError:
            for handle in list(self.workers.values()):
                log.warning("worker %d did not stop in time; killing it", handle.worker_id)
                self._retire(handle, signal.SIGKILL)
            await self._all_exited.wait()
        assert self._done is not None
        if not self._done.done():
            self._done.set_result(None)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # --- main ---------------------------------------------------------------------------

    async def main(self, first: list[WorkerHandle]) -> int:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            loop.add_signal_handler(sig, self.enqueue, sig.name[3:])
        dispatcher = asyncio.create_task(self.dispatch(), name="llproxy-dispatch")
        for handle in first:
            await self._watch(handle)
        await self.discovery.start()
        self.services.usage.start()
        self.services.desk.start()
        try:
            await self.discovery.scan_now()
        except Exception:
            log.exception("first scan failed")
        self._keep("telemetry poll", self._poll_telemetry)
        if (interval := self.notifier.watchdog_interval) is not None:
            self._keep("watchdog", lambda: self._watchdog(interval))
        try:
            async with asyncio.timeout(BOOT_TIMEOUT):
                await asyncio.gather(*(h.ready for h in first if h.ready is not None))
        except Exception as exc:
            if self._stopping is None:
                log.error("workers failed to start: %s", exc)
                self.exit_code = EX_BOOT_FAILURE
                self.enqueue("TERM")
        else:
            log.info(
                "llproxy serving on http://%s:%d with %d workers (config: %s)",
                self.config.bindip,
                self.config.port,
                len(first),
                self.config.source,
                extra={"event": "ready", "bindip": self.config.bindip, "port": self.config.port},
            )
            self.notifier.ready(f"serving {len(self.registry.models)} models")
            log.info("stores: %s", describe_stores(self.config))
            if self.console is not None:
                self.console.start(self.enqueue)
        await self._done
        await self.discovery.stop()
        await self.services.desk.close()
        # After every worker exited: their last usage batches are in, write them all.
        await self.services.usage.close()
        dispatcher.cancel()
        for task in list(self._tasks):
            if task is not self._stopping:
                task.cancel()
        await asyncio.gather(dispatcher, *self._tasks, return_exceptions=True)
        return self.exit_code


def run(config: Config, options: ServeOptions) -> int:
    """Serve until told to stop; the exit code for the process."""
    problem = missing_library(config)
    if problem is not None:
        log.error("cannot start: %s", problem)
        return EX_BOOT_FAILURE
    listeners = Listeners(config.bindip, config.port, config.reuse_port)
    try:
        listeners.open()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.bindip, config.port, exc.strerror or exc)
        listeners.close()
        return EX_BIND_FAILURE
    supervisor = Supervisor(options, config, listeners)
    if options.console:
        from ..ui.console import InteractiveConsole

        supervisor.console = InteractiveConsole()
    # Workers are started before the master has an event loop, as a pre-fork server should.
    first = [supervisor.spawn(config, slot) for slot in range(supervisor.target)]
    try:
        return uvloop.run(supervisor.main(first))
    finally:
        listeners.close()
        supervisor.notifier.close()
