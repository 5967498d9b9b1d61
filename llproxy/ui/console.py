"""The interactive console on a terminal's stdin, and the tables its commands show.

A line typed is only turned into an event for the supervisor's dispatcher, the same
queue that signals feed; Ctrl-D (end of input) means `quit`, as in a shell.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from ..core.registry import Registry
from ..process.channel import StatsReply
from ..telemetry.metrics import Telemetry
from .tables import health_states, models_table

COMMANDS = {
    "help": "list the commands",
    "clear": "clear the screen",
    "models": "table of the models and their replicas, each with its state (up, ejected)",
    "scan": "rescan the endpoints now",
    "stats": "requests, errors, tokens and in-flight per model and worker",
    "workers": "the worker processes",
    "reload": "re-read the config file and restart the workers gently (as SIGHUP)",
    "quit": "finish requests in flight and stop (also: exit, Ctrl-D)",
}
ALIASES = {"exit": "quit", "?": "help", "cls": "clear"}


class InteractiveConsole:
    def __init__(self) -> None:
        self.out = Console(highlight=False)
        self._enqueue: Callable[[str], None] | None = None
        self._fd = sys.stdin.fileno()
        self._buffer = b""

    def start(self, enqueue: Callable[[str], None]) -> None:
        self._enqueue = enqueue
        asyncio.get_running_loop().add_reader(self._fd, self._readable)
        self.out.print("[dim]console ready: type 'help' for commands[/dim]")

    def stop(self) -> None:
        if self._enqueue is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._enqueue = None

    def _readable(self) -> None:
        assert self._enqueue is not None
        try:
            data = os.read(self._fd, 4096)
        except OSError:
            data = b""
        if not data:  # Ctrl-D on an empty line, or the terminal went away
            enqueue = self._enqueue
            self.stop()
            enqueue("quit")
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            word = line.decode(errors="replace").strip().lower()
            if not word:
                continue
            command = ALIASES.get(word, word)
            if command in COMMANDS:
                self._enqueue(command)
            else:
                self.out.print(f"[yellow]unknown command {word!r}[/yellow]: type 'help'")

    def clear(self) -> None:
        self.out.clear()

    def show_help(self) -> None:
        table = Table(show_header=False, box=None)
        for name, text in COMMANDS.items():
            table.add_row(f"[bold]{name}[/bold]", text)
        self.out.print(table)

    def show_models(self, registry: Registry, replies: Sequence[StatsReply]) -> None:
        """The models, each replica with its state in the workers that answered."""
        merged = Telemetry()
        for reply in replies:
            merged.merge(reply.telemetry)
        self.out.print(models_table(registry, health_states(merged, len(replies))))

    def show_workers(self, workers: Sequence[Any]) -> None:
        table = Table(title=f"{len(workers)} workers")
        for column in ("worker", "pid", "state", "up"):
            table.add_column(column)
        now = time.monotonic()
        for handle in sorted(workers, key=lambda h: h.worker_id):
            if handle.retiring:
                state = "[yellow]stopping[/yellow]"
            elif handle.ready is not None and handle.ready.done():
                state = "[green]serving[/green]"
            else:
                state = "starting"
            table.add_row(
                str(handle.worker_id), str(handle.pid), state, f"{now - handle.started:.0f}s"
            )
        self.out.print(table)

    def show_stats(self, replies: Sequence[StatsReply]) -> None:
        table = Table(title="requests since each worker started")
        for column in (
            "worker",
            "model",
            "requests",
            "errors",
            "prompt tok",
            "completion tok",
            "in flight",
        ):
            table.add_column(column, justify="right" if column != "model" else "left")
        totals = [0, 0, 0, 0, 0]
        for reply in replies:
            for model, numbers in sorted(reply.telemetry.by_model().items()):
                row = [
                    numbers["requests"],
                    numbers["errors"],
                    numbers["prompt_tokens"],
                    numbers["completion_tokens"],
                    numbers["in_flight"],
                ]
                totals = [a + b for a, b in zip(totals, row, strict=True)]
                table.add_row(str(reply.worker_id), model, *map(str, row))
        table.add_section()
        table.add_row("all", "", *map(str, totals), style="bold")
        self.out.print(table)
