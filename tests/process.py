"""Real `llproxy` processes for tests (`serve`, or any other command): on pipes or on a
pseudo-terminal.

Its output is collected as it comes, so a test can wait for a line while the process
keeps running, then send it real signals or console input.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import free_port_block

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class LlproxyCommand:
    """Any `python -m llproxy …` command, on pipes or a pseudo-terminal."""

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        terminal: bool = False,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.cwd = cwd
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        # Never the developer's real state directory.
        self._state = tempfile.mkdtemp(prefix="llproxy-test-state-")
        self.env.setdefault("LLPROXY_STATE_DIR", self._state)
        if terminal:
            self.env.setdefault("COLUMNS", "160")
        else:
            self.env.setdefault("NO_COLOR", "1")
        self.terminal = terminal
        self.output = ""
        self._changed = asyncio.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self._master_fd: int | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        command = [sys.executable, "-m", "llproxy", *self.args]
        if self.terminal:
            master, slave = pty.openpty()
            self.proc = subprocess.Popen(
                command,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=self.env,
                start_new_session=True,
            )
            os.close(slave)
            self._master_fd = master
            os.set_blocking(master, False)
            asyncio.get_running_loop().add_reader(master, self._read_pty)
        else:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
            assert self.proc.stdout is not None
            self._reader = asyncio.create_task(self._read_pipe(self.proc.stdout.fileno()))

    def _append(self, data: bytes) -> None:
        self.output += data.decode(errors="replace")
        self._changed.set()

    def _read_pty(self) -> None:
        assert self._master_fd is not None
        try:
            data = os.read(self._master_fd, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: the terminal's other side closed
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self._master_fd)
            self._changed.set()
            return
        self._append(data)

    async def _read_pipe(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", closefd=False)
        )
        try:
            while chunk := await reader.read(65536):
                self._append(chunk)
        finally:
            transport.close()
            self._changed.set()

    def write(self, text: str) -> None:
        assert self._master_fd is not None, "console input needs terminal=True"
        os.write(self._master_fd, text.encode())

    async def wait_for(
        self, pattern: str, timeout: float = 20, after: int = 0, raw: bool = False
    ) -> re.Match[str]:
        """The first match of a regex in the output from offset `after`; colour codes are
        stripped before matching unless raw."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.output[after:]
            match = re.search(pattern, text if raw else _ANSI.sub("", text))
            if match:
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {pattern!r} in output:\n{self.output[-3000:]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.2))

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"llproxy did not exit:\n{self.output[-3000:]}")
            await asyncio.sleep(0.05)
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reader, 5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self._master_fd is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._master_fd)
            os.close(self._master_fd)
            self._master_fd = None
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self._state, ignore_errors=True)


class LlproxyProcess(LlproxyCommand):
    """A real `llproxy serve` on a port of its own."""

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        terminal: bool = False,
        port: int | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.port = port or free_port_block(1)
        super().__init__(["serve", "--bindport", str(self.port), *args], env, terminal, cwd)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"llproxy exited {self.proc.returncode}:\n{self.output}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{self.url}/health") as resp:
                        # One worker may answer before the others serve: the master's
                        # banner says when all of them do.
                        if resp.status == 200 and "serving on" in self.output:
                            return
                await asyncio.sleep(0.05)
        raise AssertionError(f"llproxy not ready:\n{self.output}")

    async def health(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        # A fresh connection each time, so the kernel may hand it to any worker.
        async with session.get(f"{self.url}/health", headers={"Connection": "close"}) as resp:
            assert resp.status == 200
            body: dict[str, Any] = await resp.json()
            return body


def run_cli(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    """A one-shot `llproxy` command (keys, scan, …) with its own state directory."""
    return subprocess.run(
        [sys.executable, "-m", "llproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LLPROXY_STATE_DIR": str(state)},
    )


def create_key(state: Path, name: str, *extra: str) -> str:
    done = run_cli("keys", "create", "--name", name, *extra, state=state)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
