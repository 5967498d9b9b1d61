"""The operator terminal's input line when it is a terminal: GNU readline edits it after
a prompt that says the mode and what Enter does, and whatever the terminal prints while
a line is half typed goes above it: the line is cleared, the output printed, the prompt
and the half-typed text drawn again. A thread reads the lines, as for a pipe."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import termios
import threading
from collections.abc import Callable
from typing import Any, TextIO

_CLEAR_LINE = "\r\x1b[2K"


class PromptedLines:
    """The lines typed, None at the end of input (Ctrl-D)."""

    def __init__(self, prompt: Callable[[], str], out: TextIO | None = None) -> None:
        import readline  # input() edits with it once imported: arrows, history

        self._readline = readline
        self.prompt = prompt
        self.out = out or sys.stdout
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()  # one writer at a time: the prompt or the output
        # readline holds the terminal in its own mode while it waits for a line: what
        # it was is put back when the terminal leaves in the middle of one.
        self._saved = _terminal_mode()
        self._left = False  # the last words are printed: no prompt after them
        reader = threading.Thread(target=self._read, name="llproxy-operator-prompt", daemon=True)
        reader.start()

    def _read(self) -> None:
        while True:
            with self._lock:
                prompt = self.prompt()
            try:
                line = input(prompt)
            except (EOFError, OSError):
                break
            self._put(line)
        self._put(None)

    def _put(self, line: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the terminal left
            self._loop.call_soon_threadsafe(self.queue.put_nowait, line)

    def above(self, write: Callable[[], None], replacing: int = 0, redraw: bool = True) -> None:
        """Print with `write` above the line being typed, then draw that line again
        (unless the terminal is leaving); `replacing` lines printed just before (a table
        drawn again) are overwritten."""
        with self._lock:
            self.out.write(_CLEAR_LINE)
            if replacing:
                self.out.write(f"\x1b[{replacing}A\r\x1b[J")  # up, and clear to the end
            self.out.flush()
            write()
            if redraw:
                self.out.write(self.prompt() + self._readline.get_line_buffer())
            self.out.flush()
            self._left = not redraw

    def close(self) -> None:
        """The terminal as it was, the cursor on a line of its own."""
        if self._saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved)
        if not self._left:  # the cursor is after the prompt
            with contextlib.suppress(OSError, ValueError):
                self.out.write("\n")
                self.out.flush()


def _terminal_mode() -> list[Any] | None:
    try:
        return termios.tcgetattr(sys.stdin.fileno())
    except (termios.error, OSError, ValueError):
        return None


def interactive() -> bool:
    """Whether input and output are a person's terminal (else lines come from a pipe)."""
    return sys.stdin.isatty() and sys.stdout.isatty()
