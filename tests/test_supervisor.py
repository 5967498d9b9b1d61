"""The daemon as a real process: workers, signals, reload, console, metrics, sd_notify."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import openai
import pytest

from llproxy.config import parse_config
from llproxy.process.supervisor import (
    EX_BIND_FAILURE,
    EX_BOOT_FAILURE,
    EX_SOFTWARE,
    RESTART_LIMIT,
    ServeOptions,
    Supervisor,
)

from .conftest import UpstreamFactory, chat_request, write_config
from .process import LlproxyProcess

CHAT = [{"role": "user", "content": "hi"}]
Start = Callable[..., Awaitable[LlproxyProcess]]


async def worker_pids(daemon: LlproxyProcess, want: int, seconds: float = 10) -> set[int]:
    """Distinct worker pids seen by /health over fresh connections, until `want` or time."""
    seen: set[int] = set()
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while len(seen) < want and time.monotonic() < deadline:
            seen.add((await daemon.health(session))["pid"])
    return seen


async def model_ids(daemon: LlproxyProcess) -> list[str]:
    async with aiohttp.ClientSession() as session, session.get(f"{daemon.url}/v1/models") as resp:
        return [m["id"] for m in (await resp.json())["data"]]


async def test_workers_start_and_a_killed_worker_is_replaced(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream()
    config = write_config(tmp_path / "c.json", [upstream])
    daemon = await start_llproxy("--config", str(config), "--workers", "2")
    async with aiohttp.ClientSession() as session:
        assert (await daemon.health(session))["workers"] == 2
    pids = await worker_pids(daemon, 2)
    assert len(pids) == 2 and daemon.pid not in pids

    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    await daemon.wait_for(rf"pid {victim}\) died \(signal SIGKILL\); starting a new one")
    client = openai.AsyncOpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0)
    async with client:
        for _ in range(10):  # every request after the kill succeeds
            reply = await client.chat.completions.create(model="fake-model", messages=CHAT)
            assert reply.choices[0].message.content
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = await worker_pids(daemon, 2, seconds=1)
        if len(now) == 2 and victim not in now:
            break
    assert len(now) == 2 and victim not in now


async def test_sigterm_lets_a_stream_finish_and_exits_0(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream(chunks=8, chunk_delay=0.25)
    config = write_config(tmp_path / "c.json", [upstream])
    daemon = await start_llproxy("--config", str(config), "--workers", "2")
    client = openai.AsyncOpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0)
    async with client:
        stream = await client.chat.completions.create(
            model="fake-model", messages=CHAT, stream=True
        )
        contents = []
        async for chunk in stream:
            if not contents:
                daemon.signal(signal.SIGTERM)  # mid-stream
            contents.append(chunk.choices[0].delta.content)
    assert contents == [f"w{i} " for i in range(8)]
    assert await daemon.wait_exit() == 0
    assert "shutting down" in daemon.output


async def test_after_sigterm_new_connections_are_refused_at_once(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    """While a stream drains, a new client is refused at once, not left hanging in the
    queue of a socket nobody accepts on."""
    upstream = await start_upstream(chunks=12, chunk_delay=0.25)
    config = write_config(tmp_path / "c.json", [upstream])
    daemon = await start_llproxy("--config", str(config), "--workers", "2")
    async with chat_request(daemon.url) as resp:
        await resp.content.readany()
        daemon.signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        with pytest.raises(ConnectionRefusedError):
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", daemon.port), 2
            )
            # Accepted after all: then it must be answered at once, never hang.
            writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await asyncio.wait_for(reader.read(), 2)
            writer.close()
        assert b"data: [DONE]" in await resp.read()  # the stream in flight finished
    assert await daemon.wait_exit() == 0


async def test_reloads_under_keep_alive_load_fail_no_request(
    start_llproxy: Start, tmp_path: Path
) -> None:
    """Retiring workers tell each client `Connection: close` on its last answer instead of
    closing a connection the client is about to use."""
    from .fast import fast_upstream

    async with fast_upstream() as port:
        config = tmp_path / "c.json"
        config.write_text(
            json.dumps(
                {"endpoints": [{"hostname": "127.0.0.1", "port_start": port}], "rate_limit": None}
            )
        )
        daemon = await start_llproxy("--config", str(config), "--workers", "2")
        body = {"model": "bench-model", "messages": CHAT}
        outcomes: dict[str, int] = {}
        running = True

        async def client(session: aiohttp.ClientSession) -> None:
            while running:
                try:
                    async with session.post(f"{daemon.url}/v1/chat/completions", json=body) as resp:
                        await resp.read()
                        outcome = str(resp.status)
                except aiohttp.ClientError as exc:
                    outcome = type(exc).__name__
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

        async def reloads() -> None:
            nonlocal running
            for _ in range(2):
                await asyncio.sleep(1.0)
                daemon.signal(signal.SIGHUP)
                await daemon.wait_for(r"reloaded .*: 2 workers", after=len(daemon.output))
            await asyncio.sleep(0.5)
            running = False

        connector = aiohttp.TCPConnector(limit=8)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(reloads(), *(client(session) for _ in range(8)))
    assert set(outcomes) == {"200"}, outcomes
    assert outcomes["200"] > 500


async def test_graceful_timeout_cancels_what_is_left(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream(chunks=100, chunk_delay=0.2)
    config = write_config(tmp_path / "c.json", [upstream])
    daemon = await start_llproxy(
        "--config", str(config), "--workers", "1", "--graceful-timeout", "1"
    )
    async with chat_request(daemon.url) as resp:
        await resp.content.readany()
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()  # cut off after the grace period, not after 20 s of stream
    assert await daemon.wait_exit() == 0
    assert time.monotonic() - started < 15
    await asyncio.wait_for(upstream.fake.disconnected.wait(), 5)


async def test_second_sigint_forces(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream(chunks=100, chunk_delay=0.2)
    config = write_config(tmp_path / "c.json", [upstream])
    daemon = await start_llproxy("--config", str(config), "--workers", "1")
    async with chat_request(daemon.url) as resp:
        await resp.content.readany()
        daemon.signal(signal.SIGINT)
        await daemon.wait_for("again to force")
        daemon.signal(signal.SIGINT)
        assert await daemon.wait_exit(timeout=10) != 0
    assert "second interrupt" in daemon.output


async def test_sighup_adds_an_endpoint_and_a_broken_config_keeps_the_old(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    first = await start_upstream(model_ids=["first"])
    second = await start_upstream(model_ids=["second"])
    config = write_config(tmp_path / "c.json", [first])
    daemon = await start_llproxy("--config", str(config), "--workers", "2")
    assert await model_ids(daemon) == ["first"]

    # A stream in flight across the reload is not dropped.
    slow = await start_upstream(model_ids=["slow"], chunks=6, chunk_delay=0.3)
    write_config(config, [first, slow])
    daemon.signal(signal.SIGHUP)
    await daemon.wait_for(r"reloaded .*: 2 workers")
    deadline = time.monotonic() + 10
    while "slow" not in await model_ids(daemon) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    client = openai.AsyncOpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0)
    async with client:
        stream = await client.chat.completions.create(model="slow", messages=CHAT, stream=True)
        contents = []
        async for chunk in stream:
            if not contents:
                write_config(config, [first, slow, second])
                mark = len(daemon.output)
                daemon.signal(signal.SIGHUP)
            contents.append(chunk.choices[0].delta.content)
        assert contents == [f"w{i} " for i in range(6)]
    await daemon.wait_for(r"reloaded .*: 2 workers", after=mark)
    deadline = time.monotonic() + 10
    while "second" not in await model_ids(daemon) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert await model_ids(daemon) == ["first", "second", "slow"]

    config.write_text('{"endpoints": [{"hostname": "127.0.0.1", "port_start": 9, "port_end": 1}]}')
    mark = len(daemon.output)
    daemon.signal(signal.SIGHUP)
    await daemon.wait_for(
        r"configuration error, keeping the old one: .*endpoints\[0\]\.port_end", after=mark
    )
    assert await model_ids(daemon) == ["first", "second", "slow"]
    assert daemon.proc is not None and daemon.proc.poll() is None


async def test_ttin_and_ttou_change_the_worker_count(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream()
    config = write_config(tmp_path / "c.json", [upstream])
    daemon = await start_llproxy("--config", str(config), "--workers", "1")
    daemon.signal(signal.SIGTTIN)
    await daemon.wait_for(r"adding a worker \(now 2\)")
    assert len(await worker_pids(daemon, 2)) == 2
    daemon.signal(signal.SIGTTOU)
    await daemon.wait_for(r"retiring worker \d+ \(now 1\)")
    deadline = time.monotonic() + 10
    async with aiohttp.ClientSession() as session:
        while (await daemon.health(session))["workers"] != 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert (await daemon.health(session))["workers"] == 1


async def test_busy_port_fails_before_any_worker(start_llproxy: Start) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        daemon = await start_llproxy("--workers", "2", ready=False, port=port)
        assert await daemon.wait_exit(timeout=20) == EX_BIND_FAILURE
    assert "cannot listen on 127.0.0.1" in daemon.output
    assert "in use" in daemon.output


async def test_worker_boot_failure_stops_the_daemon(start_llproxy: Start, tmp_path: Path) -> None:
    # A worker that cannot even import: spawned children run with --multiprocessing-fork.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nif '--multiprocessing-fork' in sys.argv:\n    raise SystemExit(17)\n"
    )
    daemon = await start_llproxy("--workers", "2", ready=False, env={"PYTHONPATH": str(tmp_path)})
    assert await daemon.wait_exit(timeout=30) == EX_BOOT_FAILURE
    # Python reports a failing sitecustomize as a fatal error, exit code 1.
    assert re.search(
        r"failed before serving \(exit code [1-9]\d*\); stopping llproxy", daemon.output
    )
    assert daemon.output.count("failed before serving") <= 2  # no respawn loop


async def test_metrics_aggregate_over_workers(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream(first_byte_delay=0.05)
    config = write_config(tmp_path / "c.json", [upstream])
    daemon = await start_llproxy("--config", str(config), "--workers", "2", "-v")
    sent = 0
    async with aiohttp.ClientSession() as session:
        # Concurrent requests on fresh connections until both workers have served some.
        for _ in range(40):
            replies = await asyncio.gather(
                *(
                    session.post(
                        f"{daemon.url}/v1/chat/completions",
                        json={"model": "fake-model", "messages": CHAT},
                        headers={"Connection": "close"},
                    )
                    for _ in range(8)
                )
            )
            for reply in replies:
                assert reply.status == 200
                reply.release()
            sent += len(replies)
            served_by = set(daemon.output.count(f"w{w} POST") > 0 and w for w in (1, 2))
            if served_by == {1, 2}:
                break
        assert {1, 2} <= {w for w in (1, 2) if f"w{w} POST" in daemon.output}
        scrapes = []
        for _ in range(6):
            async with session.get(f"{daemon.url}/metrics", headers={"Connection": "close"}) as r:
                scrapes.append(await r.text())
    wanted = (
        f'llproxy_requests_total{{dialect="openai",model="fake-model",status="200"}} {float(sent)}'
    )
    for text in scrapes:  # whichever worker answers the scrape, it reports all workers
        assert wanted in text
        assert f'llproxy_prompt_tokens_total{{model="fake-model"}} {float(7 * sent)}' in text
        assert "llproxy_models 1.0" in text and "llproxy_servers 1.0" in text
        assert "llproxy_time_to_first_token_seconds_bucket" in text
        assert 'llproxy_requests_in_flight{model="fake-model"} 0.0' in text


async def test_console_commands_under_a_terminal(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream(model_ids=["org/console-model.gguf"])
    config = write_config(tmp_path / "c.json", [upstream])
    daemon = await start_llproxy("--config", str(config), "--workers", "2", "-v", terminal=True)
    await daemon.wait_for("console ready")
    client = openai.AsyncOpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0)
    async with client:
        await client.chat.completions.create(model="console-model", messages=CHAT)
    # Verbose request lines are coloured on a terminal.
    line = await daemon.wait_for(r".*POST /v1/chat/completions.*", raw=True)
    assert "\x1b[" in line.group(0)

    mark = len(daemon.output)
    daemon.write("help\n")
    await daemon.wait_for("rescan the endpoints now", after=mark)
    daemon.write("models\n")
    await daemon.wait_for("console-model", after=mark)
    daemon.write("workers\n")
    await daemon.wait_for("2 workers", after=mark)
    daemon.write("stats\n")
    await daemon.wait_for(r"all\s*│\s*│\s*1\s*│\s*0\s*│\s*7\s*│\s*5", after=mark)
    daemon.write("frobnicate\n")
    await daemon.wait_for("unknown command 'frobnicate'", after=mark)
    mark = len(daemon.output)
    daemon.write("clear\n")
    await daemon.wait_for(r"\x1b\[2J", after=mark, raw=True)
    daemon.write("quit\n")
    assert await daemon.wait_exit() == 0


async def test_console_ctrl_d_quits(start_llproxy: Start, tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text('{"endpoints": []}')
    daemon = await start_llproxy("--config", str(config), "--workers", "1", terminal=True)
    await daemon.wait_for("console ready")
    daemon.write("\x04")  # Ctrl-D at the start of a line: end of input
    assert await daemon.wait_exit() == 0


async def test_no_console_when_stdin_is_not_a_terminal(
    start_llproxy: Start, tmp_path: Path
) -> None:
    config = tmp_path / "c.json"
    config.write_text('{"endpoints": []}')
    daemon = await start_llproxy("--config", str(config), "--workers", "1")
    await daemon.wait_for("serving on")
    assert "console ready" not in daemon.output
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0


async def test_json_log_format(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream()
    config = write_config(tmp_path / "c.json", [upstream])
    daemon = await start_llproxy(
        "--config", str(config), "--workers", "1", "-v", "--log-format", "json"
    )
    client = openai.AsyncOpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0)
    async with client:
        await client.chat.completions.create(model="fake-model", messages=CHAT)
    await daemon.wait_for('"event":"request"')
    daemon.signal(signal.SIGTERM)
    await daemon.wait_exit()
    records = [json.loads(line) for line in daemon.output.splitlines() if line.strip()]
    request = next(r for r in records if r.get("event") == "request")
    assert request["model"] == "fake-model" and request["status"] == 200
    assert request["prompt_tokens"] == 7 and request["completion_tokens"] == 5
    assert any(r.get("event") == "scan" for r in records)


async def test_sd_notify_messages_in_order(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream()
    config = write_config(tmp_path / "c.json", [upstream])
    notify_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.setblocking(False)
        env = {"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "300000"}
        daemon = await start_llproxy("--config", str(config), "--workers", "2", env=env)
        loop = asyncio.get_running_loop()

        async def next_message() -> str:
            return (await asyncio.wait_for(loop.sock_recv(notify, 4096), 20)).decode()

        async def next_non_watchdog() -> str:
            while (message := await next_message()) == "WATCHDOG=1":
                pass
            return message

        first = await next_non_watchdog()
        assert first.startswith("READY=1\nSTATUS=serving 1 models")
        assert await next_message() == "WATCHDOG=1"  # WatchdogSec set: pings keep coming
        daemon.signal(signal.SIGHUP)
        reloading = await next_non_watchdog()
        assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert (await next_non_watchdog()).startswith("READY=1")
        daemon.signal(signal.SIGTERM)
        assert await next_non_watchdog() == "STOPPING=1"
        assert await daemon.wait_exit() == 0


async def test_sd_notify_to_a_receiver_that_never_reads(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    """A full notify queue drops watchdog pings instead of blocking the master: it still
    says it serves and stops on SIGTERM."""
    upstream = await start_upstream()
    config = write_config(tmp_path / "c.json", [upstream])
    notify_path = str(tmp_path / "notify.sock")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler,
    ):
        receiver.bind(notify_path)  # and never read
        filler.setblocking(False)
        queued = 0
        with contextlib.suppress(BlockingIOError):
            while queued < 10_000:
                filler.sendto(b"FILLER=1", notify_path)
                queued += 1
        assert queued < 10_000, "the receiver's queue never filled"
        env = {"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000"}
        daemon = await start_llproxy("--config", str(config), "--workers", "1", env=env)
        await daemon.wait_for("serving on")
        await daemon.wait_for("is not reading; 1 messages dropped")
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit(timeout=30) == 0


async def test_very_verbose_logs_bodies_with_secrets_redacted(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream()
    config = write_config(tmp_path / "c.json", [upstream])
    daemon = await start_llproxy("--config", str(config), "--workers", "1", "-vv")
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "x" * 5000}],
        "api_key": "sk-body-secret",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{daemon.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": "Bearer sk-client-secret", "x-api-key": "sk-other-secret"},
        ) as resp,
    ):
        assert resp.status == 200
    await daemon.wait_for(r"response body .*w0 w1 w2")
    line = (await daemon.wait_for(r"request POST /v1/chat/completions headers .*")).group(0)
    assert "'Authorization': '***'" in line and "'x-api-key': '***'" in line
    assert "bytes)" in daemon.output  # the 5 kB body was truncated
    daemon.signal(signal.SIGTERM)
    await daemon.wait_exit()
    for secret in ("sk-body-secret", "sk-client-secret", "sk-other-secret"):
        assert secret not in daemon.output


async def test_a_failing_master_task_is_restarted_or_stops_the_daemon(tmp_path: Path) -> None:
    """A service loop of the master that fails starts again; one that keeps failing, or a
    critical task that fails, stops the daemon with a non-zero exit instead of leaving a
    dead task behind."""
    config = parse_config({"endpoints": [], "state_dir": str(tmp_path)})
    with socket.socket() as sock:
        supervisor = Supervisor(ServeOptions(lambda: config), config, sock)
        supervisor.restart_delay = 0.01
        runs = {"flaky": 0, "broken": 0}

        async def flaky() -> None:
            runs["flaky"] += 1
            if runs["flaky"] < 3:
                raise RuntimeError("flaky")

        async def broken() -> None:
            runs["broken"] += 1
            raise RuntimeError("broken")

        supervisor._keep("flaky", flaky)
        async with asyncio.timeout(10):
            while supervisor._tasks:
                await asyncio.sleep(0.01)
        assert runs["flaky"] == 3 and supervisor.exit_code == 0 and supervisor.events.empty()
        supervisor._keep("broken", broken)
        assert await asyncio.wait_for(supervisor.events.get(), 10) == "TERM"
        assert runs["broken"] == RESTART_LIMIT and supervisor.exit_code == EX_SOFTWARE

        supervisor.exit_code = 0
        supervisor._own(broken(), critical=True)
        assert await asyncio.wait_for(supervisor.events.get(), 10) == "TERM"
        assert supervisor.exit_code == EX_SOFTWARE


async def test_a_silent_worker_is_named_when_numbers_are_gathered(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    """The master's numbers from its workers: a stopped worker is named as silent (its
    last numbers stand in), not "only 1 of 2 workers answered"."""
    upstream = await start_upstream()
    config = write_config(tmp_path / "c.json", [upstream])
    daemon = await start_llproxy("--config", str(config), "--workers", "2")
    pids = await worker_pids(daemon, 2)
    stopped = min(pids)
    os.kill(stopped, signal.SIGSTOP)
    try:
        mark = len(daemon.output)
        # The master asks every worker every few seconds; a stopped one cannot answer.
        await daemon.wait_for(
            r"worker \d+ sent no numbers within 2 s \(busy or stuck\)", after=mark
        )
        assert "workers answered" not in daemon.output
    finally:
        os.kill(stopped, signal.SIGCONT)
