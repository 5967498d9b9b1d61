"""Usage accounting: exact upstream numbers, hidden usage chunk, nothing lost on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from llproxy.core.record import RequestRecord
from llproxy.core.sse import ChoiceReader, EventRelay, json_document, usage_of_json_answer
from llproxy.core.usage import UsageRecord
from llproxy.stores.sqlite import DATABASE, UsageWriter

from .conftest import ProxyFactory, RunningProxy, UpstreamFactory, recorded, write_config
from .process import LlproxyProcess, create_key, run_cli

CHAT = [{"role": "user", "content": "hi"}]
Start = Callable[..., Awaitable[LlproxyProcess]]


def event(document: Any) -> bytes:
    return b"data: " + orjson.dumps(document) + b"\n\n"


def test_usage_chunk_filter_at_every_split() -> None:
    content = [event({"choices": [{"delta": {"content": f"w{i}"}}]}) for i in range(3)]
    usage = event({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3}})
    stream = b"".join(content) + usage + b"data: [DONE]\n\n"
    expected = b"".join(content) + b"data: [DONE]\n\n"
    for cut in range(1, len(stream)):
        exchange = RequestRecord()
        events = EventRelay(exchange, None, hide_usage=True)
        out = events.feed(stream[:cut]) + events.feed(stream[cut:]) + events.finish()
        assert out == expected, cut
        assert (exchange.prompt_tokens, exchange.completion_tokens) == (11, 3)
    # Byte by byte, and with CRLF line ends.
    crlf = stream.replace(b"\n", b"\r\n")
    exchange = RequestRecord()
    events = EventRelay(exchange, None, hide_usage=True)
    out = b"".join(events.feed(crlf[i : i + 1]) for i in range(len(crlf))) + events.finish()
    assert out == expected.replace(b"\n", b"\r\n") and exchange.prompt_tokens == 11


def test_usage_on_a_content_chunk_is_read_but_the_chunk_kept() -> None:
    both = event(
        {
            "choices": [{"delta": {"content": "x"}}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1},
        }
    )
    exchange = RequestRecord()
    events = EventRelay(exchange, None, hide_usage=True)
    assert events.feed(both) + events.finish() == both
    assert exchange.prompt_tokens == 2


USAGE = {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}
CONTENT = 'the model said "usage": {"prompt_tokens": 1} }'


def top_usage(document: Any) -> Any:
    usage = document.get("usage") if isinstance(document, dict) else None
    return usage if isinstance(usage, dict) else None


@pytest.mark.parametrize(
    "raw",
    [
        orjson.dumps({"choices": [{"message": {"content": CONTENT}}], "usage": USAGE}),
        json.dumps({"choices": [], "usage": USAGE}, indent=2).encode() + b"\n",
        orjson.dumps({"usage": USAGE, "choices": [], "system_fingerprint": "x"}),
        orjson.dumps({"usage": USAGE, "choices": [{"usage": {"prompt_tokens": 1}}]}),
        orjson.dumps({"usage": USAGE, "tool": {"usage": {"prompt_tokens": 1}}}),
        orjson.dumps({"usage": USAGE, 'a"usage': {"prompt_tokens": 1}}),
        orjson.dumps({"choices": [], "usage": {**USAGE, "details": {"cached_tokens": 2}}}),
        orjson.dumps({"choices": [], "usage": None}),
        orjson.dumps({"choices": [{"message": {"content": CONTENT}}]}),
        b'{"choices": [], "usage" : {"prompt_tokens": 3}}',
        b"upstream says hi",
    ],
)
def test_usage_of_a_json_answer_is_the_top_level_one(raw: bytes) -> None:
    """Usage read from the answer's tail is exactly what parsing the whole answer gives,
    whatever else in it looks like a usage member."""
    assert top_usage(usage_of_json_answer(raw)) == top_usage(json_document(raw))


async def test_plain_and_streamed_usage_match_the_upstream(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await start_upstream(chunks=4)
    state = tmp_path / "state"
    proxy: RunningProxy = await start_proxy([upstream.endpoint()], state_dir=str(state))
    client = proxy.client()
    await client.chat.completions.create(model="fake-model", messages=CHAT)
    # The client does not ask for usage: llproxy asks, counts, and hides the extra chunk.
    stream = await client.chat.completions.create(model="fake-model", messages=CHAT, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(chunk.choices for chunk in chunks) and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "w0 w1 w2 w3 "
    sent = upstream.fake.generation_requests[-1].body
    assert sent["stream_options"] == {"include_usage": True}
    # A client that asks gets the chunk, untouched.
    stream = await client.chat.completions.create(
        model="fake-model", messages=CHAT, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    rows = await recorded(state, "model", 3)
    assert rows == [
        {
            "model": "fake-model",
            "requests": 3,
            "prompt_tokens": 21,
            "completion_tokens": 12,
            "cut": 0,
        }
    ]


async def test_no_usage_from_upstream_is_recorded_as_null(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await start_upstream(report_usage=False)
    state = tmp_path / "state"
    proxy = await start_proxy([upstream.endpoint()], state_dir=str(state))
    # The usage writer made the database, not a `keys` command: private all the same.
    await proxy.client().chat.completions.create(model="fake-model", messages=CHAT)
    stream = await proxy.client().chat.completions.create(
        model="fake-model", messages=CHAT, stream=True
    )
    assert len([c async for c in stream]) == 5
    rows = await recorded(state, "key", 2)
    assert rows == [
        {
            "client": "127.0.0.1",
            "requests": 2,
            "prompt_tokens": None,
            "completion_tokens": None,
            "cut": 0,
        }
    ]
    assert oct((state / "llproxy.db").stat().st_mode & 0o777) == "0o600"


async def test_usage_survives_sigterm_across_workers(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream(chunks=3)
    state = tmp_path / "state"
    secret = create_key(state, "team-a")
    config = write_config(tmp_path / "c.json", [upstream])
    daemon = await start_llproxy(
        "--config", str(config), "--workers", "2", env={"LLPROXY_STATE_DIR": str(state)}
    )
    client = openai.AsyncOpenAI(base_url=f"{daemon.url}/v1", api_key=secret, max_retries=0)
    async with client:
        for _ in range(5):
            await client.chat.completions.create(model="fake-model", messages=CHAT)
            stream = await client.chat.completions.create(
                model="fake-model", messages=CHAT, stream=True
            )
            assert [c async for c in stream]
    daemon.signal(signal.SIGTERM)  # at once: the last records are still in the workers
    assert await daemon.wait_exit() == 0
    done = run_cli("usage", "--json", "--by", "key", state=state)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        {"client": "team-a", "requests": 10, "prompt_tokens": 70, "completion_tokens": 30, "cut": 0}
    ]
    today = time.strftime("%Y-%m-%d")
    by_day = json.loads(run_cli("usage", "--json", "--by", "day", state=state).stdout)
    assert by_day == [
        {"day": today, "requests": 10, "prompt_tokens": 70, "completion_tokens": 30, "cut": 0}
    ]
    later = json.loads(run_cli("usage", "--json", "--since", "2999-01-01", state=state).stdout)
    assert later == []
    table = run_cli("usage", "--by", "model", state=state).stdout
    assert "fake-model" in table and "70" in table
    database = b"".join(p.read_bytes() for p in state.iterdir() if p.is_file())
    assert secret.encode() not in database
    assert oct((state / "llproxy.db").stat().st_mode & 0o777) == "0o600"


async def test_a_busy_worker_records_every_request(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    # Many requests in little time: every one is recorded, and no worker goes down. (The
    # channel's own test covers messages larger than one read, which once killed workers.)
    upstream = await start_upstream(chunks=1)
    state = tmp_path / "state"
    config = write_config(tmp_path / "c.json", [upstream], rate_limit=None)
    daemon = await start_llproxy(
        "--config", str(config), "--workers", "1", env={"LLPROXY_STATE_DIR": str(state)}
    )
    body = {"model": "fake-model", "messages": CHAT}
    async with aiohttp.ClientSession() as session:

        async def one() -> int:
            async with session.post(f"{daemon.url}/v1/chat/completions", json=body) as resp:
                await resp.read()
                return resp.status

        statuses: list[int] = []
        for _ in range(30):
            statuses.extend(await asyncio.gather(*(one() for _ in range(50))))
    assert statuses.count(200) == 1500
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    assert "died" not in daemon.output
    rows = json.loads(run_cli("usage", "--json", "--by", "model", state=state).stdout)
    assert rows == [
        {
            "model": "fake-model",
            "requests": 1500,
            "prompt_tokens": 10500,
            "completion_tokens": 1500,
            "cut": 0,
        }
    ]


async def test_writer_cancelled_mid_write_loses_and_doubles_nothing(tmp_path: Path) -> None:
    # A stop can cancel a flush while its batch is being written in the writer's thread;
    # the last flush must wait for it rather than use the database alongside it.
    writer = UsageWriter(tmp_path)
    big = [
        UsageRecord(float(i), "client", "model:tag", "127.0.0.1:1", 200, 1, 2, 0.5)
        for i in range(200_000)
    ]
    writer.add(big)
    flushing = asyncio.create_task(writer.flush())
    await asyncio.sleep(0.05)  # the thread is inserting now
    flushing.cancel()
    writer.add(big[:10])
    await writer.close()
    with sqlite3.connect(tmp_path / DATABASE) as db:
        assert db.execute("SELECT count(*) FROM usage").fetchone() == (200_010,)


async def test_usage_counts_the_answers_cut_short(tmp_path: Path) -> None:
    """`llproxy usage` shows per row how many answers llproxy cut (a loop, core/mend)."""
    writer = UsageWriter(tmp_path)
    now = time.time()
    writer.add(
        [
            UsageRecord(now, "c", "looper", None, 200, 1, 1, 1.0, cut="loop"),
            UsageRecord(now, "c", "looper", None, 200, 1, 1, 1.0),
            UsageRecord(now, "c", "calm", None, 200, 1, 1, 1.0),
        ]
    )
    await writer.close()
    rows = json.loads(run_cli("usage", "--json", "--by", "model", state=tmp_path).stdout)
    assert [(r["model"], r["requests"], r["cut"]) for r in rows] == [
        ("calm", 1, 0),
        ("looper", 2, 1),
    ]
    [day] = json.loads(run_cli("usage", "--json", "--by", "day", state=tmp_path).stdout)
    assert (day["requests"], day["cut"]) == (3, 1)
    table = run_cli("usage", "--by", "model", state=tmp_path).stdout
    assert "cut" in table.splitlines()[2]  # the header row, under the title and a rule
    [looper] = [line for line in table.splitlines() if "looper" in line]
    assert looper.split("│")[-2].strip() == "1"


class _PeekAtLogTime(logging.Handler):
    """When the access line is written, what the client's socket already holds."""

    def __init__(self, client: socket.socket) -> None:
        super().__init__(logging.INFO)
        self.client = client
        self.held: list[tuple[str, bytes]] = []

    def emit(self, record: logging.LogRecord) -> None:
        prompt = getattr(record, "prompt_tokens", None)
        try:
            held = self.client.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            held = b""
        self.held.append((str(prompt), held))


async def test_accounting_runs_once_the_client_has_the_whole_answer(
    proxy: RunningProxy,
) -> None:
    """Metrics, usage and the log line must not delay the client: when they run, the
    complete response (the last chunk of a stream, too) is already in its socket."""
    access = logging.getLogger("llproxy.access")
    loop = asyncio.get_running_loop()
    with socket.create_connection(("127.0.0.1", proxy.server.port)) as client:
        client.setblocking(False)
        peek = _PeekAtLogTime(client)
        level = access.level
        access.setLevel(logging.INFO)
        access.addHandler(peek)
        try:
            for stream in (False, True):
                body = orjson.dumps({"model": "fake-model", "messages": CHAT, "stream": stream})
                await loop.sock_sendall(
                    client,
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body),
                )
                received = b""
                end = b"0\r\n\r\n" if stream else b'"completion_tokens"'
                while end not in received or (not stream and not received.endswith(b"}")):
                    async with asyncio.timeout(10):
                        received += await loop.sock_recv(client, 1 << 20)
                assert len(peek.held) == 1 + stream
                prompt, held = peek.held[-1]
                assert held == received and held.startswith(b"HTTP/1.1 200")
                if not stream:
                    answer = orjson.loads(received.partition(b"\r\n\r\n")[2])
                    expected = str(answer["usage"]["prompt_tokens"])
                # Usage was read by then, from the body or the stream's usage chunk.
                assert prompt == expected
        finally:
            access.removeHandler(peek)
            access.setLevel(level)


@pytest.mark.parametrize(
    "usage_choices",
    [[], [{"index": 0, "delta": {}}], [{"index": 0, "delta": {}, "finish_reason": None}]],
    ids=["vllm", "litellm", "litellm-null-finish"],
)
async def test_a_usage_only_chunk_is_hidden_whatever_its_shape(
    start_upstream: UpstreamFactory,
    start_proxy: ProxyFactory,
    tmp_path: Path,
    usage_choices: list[Any],
) -> None:
    """LiteLLM's usage chunk carries one choice with an empty delta: still nothing for a
    client that did not ask for usage, and still counted."""
    upstream = await start_upstream(usage_chunk_choices=usage_choices)
    state = tmp_path / "state"
    proxy = await start_proxy([upstream.endpoint()], state_dir=str(state))
    stream = await proxy.client().chat.completions.create(
        model="fake-model", messages=CHAT, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert [c.usage for c in chunks] == [None] * 5
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "w0 w1 w2 w3 w4 "
    assert upstream.fake.generation_requests[-1].body["stream_options"] == {"include_usage": True}
    rows = await recorded(state, "model", 1)
    assert rows == [
        {"model": "fake-model", "requests": 1, "prompt_tokens": 7, "completion_tokens": 5, "cut": 0}
    ]


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


async def test_a_deleted_state_directory_loses_no_usage_record(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    """Deleted while serving, the directory and its database are made anew and the next
    records land there, with an error in the log and a metric: nothing vanishes unseen."""
    upstream = await start_upstream()
    state = tmp_path / "state"
    config = write_config(tmp_path / "c.json", [upstream])
    daemon = await start_llproxy(
        "--config", str(config), "--workers", "2", env={"LLPROXY_STATE_DIR": str(state)}
    )
    client = openai.AsyncOpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0)
    async with client:
        for _ in range(4):
            await client.chat.completions.create(model="fake-model", messages=CHAT)
        assert sum(r["requests"] for r in await recorded(state, "model", 4)) == 4
        shutil.rmtree(state)
        for _ in range(6):
            await client.chat.completions.create(model="fake-model", messages=CHAT)
        rows = await recorded(state, "model", 6)
        assert rows == [
            {
                "model": "fake-model",
                "requests": 6,
                "prompt_tokens": 42,
                "completion_tokens": 30,
                "cut": 0,
            }
        ]
        await daemon.wait_for(r"the usage database .* was removed while in use; making it anew")
        assert await metric(daemon.url, "llproxy_usage_database_recreated_total") == 1
        assert await metric(daemon.url, "llproxy_usage_records_written_total") == 10

        # A state directory that cannot be made: the records wait, and an error says why.
        shutil.rmtree(state)
        state.write_text("a file where the directory should be")
        for _ in range(3):
            await client.chat.completions.create(model="fake-model", messages=CHAT)
        await daemon.wait_for(r"cannot write 3 usage records \(kept for the next try\)")
        assert await metric(daemon.url, "llproxy_usage_write_errors_total") >= 1
        state.unlink()
        rows = await recorded(state, "model", 3)
        assert rows[0]["requests"] == 3
    assert await metric(daemon.url, "llproxy_usage_records_dropped_total") == 0


async def test_records_past_the_bound_are_dropped_and_counted(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    writer = UsageWriter(blocked, max_pending=5)
    writer.add([UsageRecord(float(i), "c", "m", None, 200, 1, 1, 1.0) for i in range(4)])
    await writer.flush()  # fails: kept
    writer.add([UsageRecord(float(i), "c", "m", None, 200, 1, 1, 1.0) for i in range(4, 8)])
    assert writer.telemetry.dropped == 3 and writer.telemetry.write_errors == 1
    blocked.unlink()
    await writer.close()
    with sqlite3.connect(blocked / DATABASE) as db:
        times = [t for (t,) in db.execute("SELECT time FROM usage ORDER BY time")]
    assert times == [3.0, 4.0, 5.0, 6.0, 7.0]  # the newest five


def test_text_that_comes_in_one_read_is_one_choice() -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return event({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    reader = ChoiceReader(RequestRecord())
    read = b"".join(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"reasoning_content": "Let me "}),
            chunk({"reasoning_content": "think."}),
            chunk({"content": "It "}),
            chunk({"content": "is "}),
            chunk({"content": "4."}),
            chunk({"content": ""}, "stop"),
        ]
    )
    choices, failure = reader.feed(read)
    assert failure is None
    assert [c["delta"] for c in choices] == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "Let me think."},
        {"content": "It is 4."},
        {"content": ""},
    ]
    assert choices[-1]["finish_reason"] == "stop"
    # Read by read, nothing is joined: each piece goes on as it came.
    reader = ChoiceReader(RequestRecord())
    pieces = [reader.feed(chunk({"content": word}))[0] for word in ("a", "b")]
    assert [[c["delta"] for c in p] for p in pieces] == [[{"content": "a"}], [{"content": "b"}]]
