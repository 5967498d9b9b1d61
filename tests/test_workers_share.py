"""Connections spread over the workers (a listening socket each, SO_REUSEPORT), and the
one shared socket of `reuse_port: false` still serves and reloads."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from llproxy.process.memory import BurstWatch, malloc_trim
from llproxy.process.supervisor import EX_BIND_FAILURE
from llproxy.process.worker import stop_accepting

from .chaos.conftest import worker_pids
from .process import LlproxyProcess

Start = Callable[..., Awaitable[LlproxyProcess]]
CONNECTIONS = 32


async def served_by(daemon: LlproxyProcess) -> Counter[int]:
    """Open CONNECTIONS connections at once, then ask /health on each: how many each
    worker (by pid) accepted."""
    opened = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", daemon.port) for _ in range(CONNECTIONS))
    )

    async def pid(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer
        return int(json.loads(body)["pid"])

    return Counter(await asyncio.gather(*(pid(r, w) for r, w in opened)))


def config(tmp_path: Path, **top: object) -> str:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"endpoints": [], **top}))
    return str(path)


async def test_two_workers_share_the_connections(start_llproxy: Start, tmp_path: Path) -> None:
    """Kernel hashing is random: the bounds are loose enough for it (a run over 80 % has
    odds of 3 in 10,000, so about 1 in 100 that one of 20 does: a rare false failure) and
    fail for one socket whose first worker to wake takes all."""
    daemon = await start_llproxy("--config", config(tmp_path), "--workers", "2")
    runs = [await served_by(daemon) for _ in range(20)]
    total: Counter[int] = sum(runs, Counter())
    assert len(total) == 2, runs
    assert all(max(run.values()) <= 0.8 * CONNECTIONS for run in runs), runs
    for count in total.values():
        assert abs(count / total.total() - 0.5) <= 0.10, runs


async def test_four_workers_none_takes_half(start_llproxy: Start, tmp_path: Path) -> None:
    """Odds that random hashing puts over half on one of 4 in one of 5 runs: ~1 in 80."""
    daemon = await start_llproxy("--config", config(tmp_path), "--workers", "4")
    runs = [await served_by(daemon) for _ in range(5)]
    assert len(sum(runs, Counter())) == 4, runs
    assert all(max(run.values()) <= CONNECTIONS / 2 for run in runs), runs


async def test_a_reload_hands_each_slot_on(start_llproxy: Start, tmp_path: Path) -> None:
    """After a reload (and a worker more) the connections spread over the new workers."""
    path = config(tmp_path)
    daemon = await start_llproxy("--config", path, "--workers", "2")
    before = set(await served_by(daemon))
    daemon.signal(signal.SIGTTIN)
    await daemon.wait_for(r"adding a worker \(now 3\)")
    daemon.signal(signal.SIGHUP)
    await daemon.wait_for(r"reloaded .*: 3 workers")
    # The retired workers take what is queued for them until they stop listening.
    deadline = time.monotonic() + 20
    while len(worker_pids(daemon.pid)) > 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    runs = [await served_by(daemon) for _ in range(5)]
    after = set(sum(runs, Counter()))
    assert after == set(worker_pids(daemon.pid)) and not after & before, runs
    assert all(max(run.values()) <= 0.8 * CONNECTIONS for run in runs), runs


async def test_one_shared_socket_when_reuse_port_is_off(
    start_llproxy: Start, tmp_path: Path
) -> None:
    daemon = await start_llproxy(
        "--config", config(tmp_path, reuse_port=False), "--workers", "2", "-vv"
    )
    assert (await served_by(daemon)).total() == CONNECTIONS
    daemon.signal(signal.SIGHUP)
    await daemon.wait_for(r"reloaded .*: 2 workers")
    assert (await served_by(daemon)).total() == CONNECTIONS
    assert "one listening socket per worker" not in daemon.output


async def test_a_retiring_worker_takes_in_what_is_queued() -> None:
    """Connections the kernel queued on a worker's socket when it stops listening are
    served, not reset with the socket's last copy (the worker count went down, or the
    daemon stops)."""

    async def served(_: web.Request) -> web.Response:
        return web.Response(text="served")

    app = web.Application()
    app.router.add_get("/", served)
    runner = web.AppRunner(app)
    await runner.setup()
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, listening)
    await site.start()
    address = listening.getsockname()
    # The event loop does not run from here to stop_accepting: nothing is accepted yet.
    clients = [socket.create_connection(address, timeout=10) for _ in range(8)]
    for client in clients:
        client.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    await stop_accepting(runner, site, listening)

    def answer(client: socket.socket) -> bytes:
        data = b""
        try:
            while chunk := client.recv(65536):
                data += chunk
        except ConnectionResetError:
            return b"reset"
        finally:
            client.close()
        return data

    try:
        answers = await asyncio.gather(*(asyncio.to_thread(answer, c) for c in clients))
    finally:
        await runner.cleanup()
    assert all(a.startswith(b"HTTP/1.1 200") and a.endswith(b"served") for a in answers), answers


async def test_a_port_another_process_shares_is_busy(start_llproxy: Start) -> None:
    """A socket that allows SO_REUSEPORT (another llproxy left running) still makes the
    port busy: the slots would otherwise join its group and take half its connections."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        daemon = await start_llproxy("--workers", "2", ready=False, port=other.getsockname()[1])
        assert await daemon.wait_exit(timeout=20) == EX_BIND_FAILURE
    assert "in use" in daemon.output


def test_a_burst_of_connections_that_closed_is_trimmed_once() -> None:
    watch = BurstWatch(burst=1000)
    assert not any(watch.fell(n) for n in (0, 10, 2500, 2000, 1600))
    assert watch.fell(1400)  # 1,100 fewer than the peak
    assert not watch.fell(900)  # the peak starts again from 1,400
    assert not watch.fell(1200)
    assert malloc_trim() is not None  # glibc here: the worker does trim
