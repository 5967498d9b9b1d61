"""Fixtures: real fake upstreams and a real llproxy app, both on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestServer

from llproxy.config import parse_config
from llproxy.server.app import serve_alone
from llproxy.server.http import AppRunner
from llproxy.server.state import DISCOVERY, STATE, ProxyState
from llproxy.stores.sqlite import usage_sums

from .fake_upstream import FakeUpstream
from .scenario_upstream import ScenarioUpstream

# Suites that start a browser, pseudo-terminals or whole process trees again and again, and
# slow down most on a loaded machine: `make test-slow` runs them (CI runs both targets), so
# that `make test` stays quick.
SLOW_SUITES = frozenset(
    {
        "test_supervisor.py",
        "test_health_workers.py",
        "test_workers_share.py",
        "test_operator_page.py",
        "test_operator_terminal.py",
        "test_fleet.py",
        "test_fleet_desk.py",
    }
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_SUITES:
            item.add_marker(pytest.mark.slow)


@dataclass
class RunningUpstream:
    fake: FakeUpstream
    server: TestServer

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    def endpoint(self, **extra: Any) -> dict[str, Any]:
        return {"hostname": "127.0.0.1", "port_start": self.port, "port_end": self.port, **extra}


@dataclass
class RunningProxy:
    app: web.Application
    server: TestServer
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def state(self) -> ProxyState:
        return self.app[STATE]

    def client(self, api_key: str = "client-secret", **kwargs: Any) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs
        )
        self.clients.append(client)
        return client

    async def rescan(self) -> None:
        await self.app[DISCOVERY].scan_now()


def free_port_block(size: int) -> int:
    """The first of `size` consecutive loopback ports that are free right now.

    Probed with SO_REUSEADDR, as servers bind: a port whose old connections linger in
    TIME_WAIT (hundreds do on a busy machine) is free for a server all the same.
    """
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            start = probe.getsockname()[1]
        if start + size > 65535:
            continue
        held = []
        try:
            for port in range(start, start + size):
                sock = socket.socket()
                held.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no block of {size} free ports")


@asynccontextmanager
async def chat_request(base_url: str, stream: bool = True) -> AsyncIterator[ClientResponse]:
    """A chat request to llproxy, open while the body is in use."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base_url}/v1/chat/completions",
            json={
                "model": "fake-model",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": stream,
            },
        ) as resp,
    ):
        yield resp


def write_config(path: Path, upstreams: list[RunningUpstream], **top: Any) -> Path:
    """An llproxy config file with one endpoint per upstream, plus any top-level keys."""
    path.write_text(json.dumps({"endpoints": [u.endpoint() for u in upstreams], **top}))
    return path


class WorkerServer(TestServer):
    """The app served as a worker serves it: llproxy's runner (the model routes dispatched
    by the server itself, parser errors answered as JSON), not aiohttp's."""

    async def _make_runner(self, **kwargs: Any) -> AppRunner:
        return AppRunner(self.app, **kwargs)


UpstreamFactory = Callable[..., Awaitable[RunningUpstream]]
ProxyFactory = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
def start_upstream(aiohttp_server: Any) -> UpstreamFactory:
    async def start(port: int | None = None, **knobs: Any) -> RunningUpstream:
        fake = FakeUpstream(**knobs)
        server = await aiohttp_server(fake.app(), port=port)
        return RunningUpstream(fake, server)

    return start


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    started: list[RunningProxy] = []

    async def start(endpoints: list[dict[str, Any]], **top: Any) -> RunningProxy:
        # Never the developer's real state directory.
        top.setdefault("state_dir", str(tmp_path / "state"))
        # `instance` is no config key: `serve` names each running llproxy.
        instance = top.pop("instance", "")
        config = parse_config({"endpoints": endpoints, **top}, environ={"TEST_KEY": "sk-up-7"})
        config = dataclasses.replace(config, instance=instance)
        app = serve_alone(config)
        server = WorkerServer(app)
        await server.start_server()
        started.append(RunningProxy(app, server))
        return started[-1]

    yield start
    for proxy in started:
        for client in proxy.clients:
            await client.close()
        await proxy.server.close()


@pytest.fixture
async def upstream(start_upstream: UpstreamFactory) -> RunningUpstream:
    return await start_upstream()


@pytest.fixture
async def proxy(start_proxy: ProxyFactory, upstream: RunningUpstream) -> RunningProxy:
    return await start_proxy([upstream.endpoint()])


@pytest.fixture
async def start_llproxy() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Start a real `llproxy serve`; every one is killed at the end of the test."""
    from .process import LlproxyProcess

    started: list[LlproxyProcess] = []

    async def start(*args: str, ready: bool = True, **kwargs: Any) -> LlproxyProcess:
        process = LlproxyProcess(args, **kwargs)
        started.append(process)
        process.start()
        if ready:
            await process.wait_ready()
        return process

    yield start
    for process in started:
        process.kill()


def start_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    """A real redis-server of a test's own, on a loopback port, keeping nothing on disk."""
    server = shutil.which("redis-server")
    assert server, "redis-server is needed (scripts/system-deps installs it)"
    options = {"port": str(port), "bind": "127.0.0.1", "save": "", "appendonly": "no"}
    options["dir"] = str(directory)
    return subprocess.Popen(
        [server, *(part for k, v in options.items() for part in (f"--{k}", v))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_listening(port: int) -> None:
    """Until something accepts connections on the loopback port."""
    for _ in range(400):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A real redis-server of this test's own, on a free loopback port."""
    port = free_port_block(1)
    proc = start_redis(port, tmp_path)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """A real PostgreSQL cluster for the session (tests/pg_cluster.py); fails, never
    skips, without PostgreSQL."""
    from .pg_cluster import PgCluster

    cluster = PgCluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def database_url(pg_cluster: Any) -> str:
    """A fresh database of this test's own in the session's cluster."""
    return str(pg_cluster.create_database(f"t_{uuid.uuid4().hex[:12]}"))


@pytest.fixture
async def scenario() -> AsyncIterator[ScenarioUpstream]:
    """The scripted upstream of the dialect tests (tests/scenario_upstream.py), started."""
    # Chunks apart, as a model writes them: text that comes in one read is translated as
    # one event, and the tests look at the stream delta by delta.
    upstream = ScenarioUpstream(chunk_delay=0.01)
    await upstream.start()
    yield upstream
    await upstream.close()


def scenario_endpoint(upstream: ScenarioUpstream, **extra: Any) -> dict[str, Any]:
    return {"url": f"{upstream.url}/v1", **extra}


async def recorded(state: Path, by: str, want: int) -> list[dict[str, Any]]:
    """Usage rows once `want` requests were written (writes are batched each second)."""
    deadline = time.monotonic() + 15
    while True:
        rows = usage_sums(state, None, by)
        if sum(r["requests"] for r in rows) >= want or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.2)
