"""The real Claude Code CLI (npm @anthropic-ai/claude-code) through llproxy's Anthropic
Messages dialect to a fake OpenAI chat-completions upstream: a plain answer, and one
round trip through Claude Code's own Read tool.

Not part of `make test`: `make claude-code` installs the pinned CLI into .cache/ and runs
these. The CLI runs as a subprocess with a throwaway HOME, a scrubbed environment, and an
HTTP(S) proxy that is a dead end on loopback: whatever it would send beyond 127.0.0.1 is
recorded there and refused, and the tests assert that there was none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from .conftest import ProxyFactory, RunningProxy, scenario_endpoint
from .scenario_upstream import ScenarioUpstream, Step, _tc

# The CLI starts in about a second; each run is bounded by CLI_TIMEOUT.
pytestmark = [pytest.mark.claude_code, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / ".cache" / "claude-code" / "node_modules" / ".bin" / "claude"
CLI_TIMEOUT = 120.0
MODEL = "fake-model"
N_CTX = 32768  # the fake llama.cpp's context (/props): less than Claude Code's prompt + 32,000
ANSWER = "The proxy works: 42."
SECRET = "violet-otter-3141"  # in the file Claude Code reads; only the tool result has it
CLIENT_KEY = "any-test-key"
REFUSED = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


@dataclass
class ClaudeCodeUpstream(ScenarioUpstream):
    """The scenario upstream (a llama.cpp-like server) answering after each request's
    content: after a tool result, text quoting the secret the result carries; for a prompt
    that names `read_path`, a Read call in fragments; else ANSWER, word by word."""

    read_path: str = ""
    call_id: str = "call_read0"

    def steps(self, body: dict[str, Any]) -> list[Step]:
        role: Step = ({"role": "assistant", "content": ""}, None)
        messages = body.get("messages") or []
        results = [_text(m.get("content")) for m in messages if m.get("role") == "tool"]
        if results:
            found = re.search(r"The secret is ([\w-]+)\.", results[-1])
            said = f"The note's secret is {found[1] if found else 'missing'}."
            return [role, ({"content": said[:9]}, None), ({"content": said[9:]}, "stop")]
        offered = {t["function"]["name"] for t in body.get("tools") or ()}
        users = [_text(m.get("content")) for m in messages if m.get("role") == "user"]
        if self.read_path and "Read" in offered and users and self.read_path in users[-1]:
            arguments = json.dumps({"file_path": self.read_path})
            return [
                ({"role": "assistant", "content": None}, None),
                (_tc(0, "", id_=self.call_id, name="Read"), None),
                (_tc(0, arguments[:15]), None),
                (_tc(0, arguments[15:]), None),
                ({}, "tool_calls"),
            ]
        words = ANSWER.split(" ")
        pieces = [w + " " for w in words[:-1]] + words[-1:]
        return [role, *(({"content": p}, None) for p in pieces), ({}, "stop")]


@dataclass
class Outside:
    """A dead-end HTTP(S) proxy on loopback: records the request line of anything the CLI
    tries to reach beyond 127.0.0.1 and answers 403, so nothing leaves the machine."""

    tried: list[str] = field(default_factory=list)
    url: str = ""
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._refuse, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            line = await asyncio.wait_for(reader.readline(), 5)
            self.tried.append(line.decode("latin-1").strip())
            writer.write(REFUSED)
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class Run:
    code: int
    output: dict[str, Any]
    stdout: str
    stderr: str


def cli() -> Path:
    if not os.access(CLI, os.X_OK):
        pytest.fail(f"the Claude Code CLI is not installed ({CLI}): run `make claude-code`")
    return CLI


async def run_claude(proxy: RunningProxy, outside: Outside, home: Path, *args: str) -> Run:
    """`claude -p … --output-format json` against llproxy, in a throwaway HOME, with none
    of this machine's environment but PATH."""
    work = home / "work"
    work.mkdir(parents=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TMPDIR": str(home),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "ANTHROPIC_BASE_URL": proxy.url,
        "ANTHROPIC_API_KEY": CLIENT_KEY,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        env[name] = outside.url
    command = [str(cli()), "-p", *args, "--output-format", "json", "--model", MODEL]
    proc = await asyncio.create_subprocess_exec(
        *command,
        "--max-turns",
        "4",
        cwd=work,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        pytest.fail(f"claude ran past {CLI_TIMEOUT} s; stdout {out!r:.2000}; stderr {err!r:.2000}")
    assert proc.returncode is not None
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    try:
        output = json.loads(stdout)
    except ValueError:
        output = {}
    assert isinstance(output, dict), f"no JSON result from claude: {stdout!r:.2000}"
    return Run(proc.returncode, output, stdout, stderr)


@pytest.fixture
async def upstream() -> AsyncIterator[ClaudeCodeUpstream]:
    # llama.cpp's listing (meta.n_ctx_train) and /props (n_ctx): llproxy learns N_CTX.
    fake = ClaudeCodeUpstream(model_id=MODEL, n_ctx_train=131072, n_ctx=N_CTX)
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def outside() -> AsyncIterator[Outside]:
    dead_end = Outside()
    await dead_end.start()
    yield dead_end
    await dead_end.close()


@pytest.fixture
async def proxy(
    start_proxy: ProxyFactory, upstream: ClaudeCodeUpstream, caplog: pytest.LogCaptureFixture
) -> RunningProxy:
    caplog.set_level(logging.INFO, logger="llproxy.access")
    # Claude Code's own side requests name Claude models: all of them go to the fake.
    return await start_proxy([scenario_endpoint(upstream)], aliases={"claude-*": MODEL})


def called(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, int]]:
    """What the CLI asked llproxy, from its access log: (method, path, status)."""
    return [
        (r.__dict__["method"], r.__dict__["path"], r.__dict__["status"])
        for r in caplog.records
        if r.name == "llproxy.access" and r.__dict__.get("event") == "request"
    ]


def check_exchange(
    run: Run, caplog: pytest.LogCaptureFixture, upstream: ClaudeCodeUpstream, outside: Outside
) -> list[dict[str, Any]]:
    """What every run must show; returns the chat bodies the upstream received."""
    calls = called(caplog)
    print(f"\nclaude exit {run.code}; llproxy served {calls}; outside tried {outside.tried}")
    print("upstream got", [(r["method"], r["path"]) for r in upstream.requests])
    assert run.code == 0, f"claude failed: {run.stdout!r:.3000} {run.stderr!r:.3000}"
    assert run.output.get("is_error") is False and run.output.get("subtype") == "success"
    assert outside.tried == []
    assert calls and all(status == 200 for _, _, status in calls), calls
    assert ("POST", "/v1/messages", 200) in calls
    bodies = upstream.bodies()
    assert bodies
    for entry in upstream.requests:  # the client's key is llproxy's business, not upstream's
        assert CLIENT_KEY not in json.dumps(entry["headers"])
    return bodies


def check_translated(body: dict[str, Any], asked: int) -> None:
    """A chat body translated from Claude Code's Messages request."""
    assert body["model"] == MODEL
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    system = body["messages"][0]
    assert system["role"] == "system" and "Claude" in system["content"]
    assert not re.search(r"cch=(?!00000)[0-9a-f]+", system["content"])  # no per-run hash
    tools = {t["function"]["name"]: t for t in body["tools"]}
    assert {"Read", "Bash", "Edit", "Write"} <= tools.keys()
    for tool in tools.values():
        assert tool["type"] == "function" and tool["function"]["parameters"]["type"] == "object"
    assert "file_path" in tools["Read"]["function"]["parameters"]["properties"]
    # Claude Code asks for more than the context leaves after its prompt: lowered to fit.
    prompt = orjson.dumps({"messages": body["messages"], "tools": body["tools"]})
    assert body["max_tokens"] < asked
    assert abs(body["max_tokens"] - (N_CTX - len(prompt) // 4)) <= 16


def asked_max_tokens(run: Run) -> int:
    """The output budget Claude Code asked for, as it reports it."""
    asked = run.output["modelUsage"][MODEL]["maxOutputTokens"]
    assert isinstance(asked, int) and asked > N_CTX // 2
    return asked


async def test_a_plain_answer(
    proxy: RunningProxy,
    upstream: ClaudeCodeUpstream,
    outside: Outside,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    run = await run_claude(proxy, outside, tmp_path / "home", "Say hello.")
    bodies = check_exchange(run, caplog, upstream, outside)
    assert run.output["result"] == ANSWER
    assert run.output["num_turns"] == 1
    main = [b for b in bodies if "Say hello." in json.dumps(b["messages"])]
    assert len(main) == 1
    check_translated(main[0], asked_max_tokens(run))
    assert main[0]["messages"][-1]["role"] != "tool"


async def test_a_read_tool_round_trip(
    proxy: RunningProxy,
    upstream: ClaudeCodeUpstream,
    outside: Outside,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    note = tmp_path / "note.txt"
    note.write_text(f"The secret is {SECRET}.\n")
    upstream.read_path = str(note)
    prompt = f"What does {note} say?"
    run = await run_claude(proxy, outside, tmp_path / "home", prompt, "--allowedTools", "Read")
    bodies = check_exchange(run, caplog, upstream, outside)
    assert run.output["result"] == f"The note's secret is {SECRET}."
    assert run.output["permission_denials"] == []
    main = [b for b in bodies if prompt in json.dumps(b["messages"])]
    assert len(main) == 2, [m["messages"][-1]["role"] for m in main]
    first, second = main
    asked = asked_max_tokens(run)
    check_translated(first, asked)
    check_translated(second, asked)
    assert not any(m["role"] == "tool" for m in first["messages"])
    # The second request is the first one plus the call and its result, in that order.
    messages = second["messages"]
    tools = [i for i, m in enumerate(messages) if m["role"] == "tool"]
    assert len(tools) == 1
    result, call = messages[tools[0]], messages[tools[0] - 1]
    assert call["role"] == "assistant" and len(call["tool_calls"]) == 1
    called_read = call["tool_calls"][0]
    assert called_read["id"] == upstream.call_id and called_read["type"] == "function"
    assert called_read["function"]["name"] == "Read"
    assert json.loads(called_read["function"]["arguments"]) == {"file_path": str(note)}
    assert result["tool_call_id"] == upstream.call_id
    assert f"The secret is {SECRET}." in _text(result["content"])
    assert messages[: tools[0] - 1] == first["messages"]
