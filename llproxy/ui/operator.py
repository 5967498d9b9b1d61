"""`llproxy operator`: a person answers requests as a model, from a terminal. Line-based:
the queue as a table, a claimed request's conversation, then every line typed reaches the
client at once as a delta, and slash commands finish, call a tool, reject or hand off.
The connection comes back by itself after a drop, and the answer resumes where it was."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from .operator_prompt import PromptedLines, interactive
from .operator_session import Event, NotAnOperator, OperatorSession
from .operator_view import QueuedRequest, answer_so_far, conversation, printable, queue_table

EXIT_OK, EXIT_FAILED = 0, 1
# Seconds before each reconnect attempt; after the last one the terminal gives up.
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0)
CONNECT_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)
# A burst of queue events (a snapshot, a race for a claim) draws the table once.
REDRAW_SECONDS = 0.1
ENDING_COMMANDS = ("finish", "reject", "handoff")
NOT_CONNECTED = "not connected: try again once the connection is back"
KEPT = "kept: it is sent once the connection is back"

HELP = (
    ("N, claim N", "claim request number N and answer it"),
    ("a line", "while answering: sent to the client at once (each after a newline but the first)"),
    ("//text", "while answering: a line that begins with / (the first / is dropped)"),
    ("/finish [stop|length]", "end the answer (tool_calls after a tool call, else stop)"),
    ("/tool NAME {json}", "a tool call; the arguments are checked against the tool's schema"),
    ("/reject [message]", "refuse the request: the client gets an error with your message"),
    ("/handoff MODEL [MODE]", "a model answers: MODE replace (before any text) or continue"),
    ("/release", "put the request back in the queue for someone else"),
    ("/queue", "show the queue; a request you hold stays yours (its number goes back)"),
    ("/help", "this list (help, queue, quit work without the / too)"),
    ("/quit", "leave (Ctrl-D too); requests you hold go back to the queue"),
)

Handler = Callable[[str], Awaitable[None]]


def run_operator(url: str, token: str) -> int:
    try:
        return asyncio.run(OperatorTerminal(url, token).run())
    except KeyboardInterrupt:
        return 130


@dataclass
class Answer:
    """A held request's answer as typed here."""

    text: str = ""  # sent, or typed while the connection was down and sent when it is back
    empty_lines: int = 0  # typed since the last line; they go with the next one


class StdinLines:
    """The lines typed, None at the end of input. A thread reads them: it never blocks the
    event loop, and it works on any stdin (a terminal, a pipe, or a file, which the
    loop's add_reader refuses)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        reader = threading.Thread(target=self._read, name="llproxy-operator-stdin", daemon=True)
        reader.start()

    def _read(self) -> None:
        buffer = b""
        while data := self._chunk():
            *lines, buffer = (buffer + data).split(b"\n")
            for line in lines:
                self._put(line.decode(errors="replace").rstrip("\r"))
        if buffer:
            self._put(buffer.decode(errors="replace"))
        self._put(None)

    @staticmethod
    def _chunk() -> bytes:
        try:
            return os.read(sys.stdin.fileno(), 4096)
        except OSError:  # the terminal went away: as good as the end of input
            return b""

    def _put(self, line: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the terminal left
            self._loop.call_soon_threadsafe(self.queue.put_nowait, line)


class OperatorTerminal:
    def __init__(self, url: str, token: str, console: Console | None = None) -> None:
        self.url = url
        self.session = OperatorSession(url, token)
        self.out = console or Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)
        self.me: str | None = None
        self.requests: dict[str, QueuedRequest] = {}
        self.numbers: dict[str, int] = {}  # every request seen, for as long as this runs
        self.answers: dict[str, Answer] = {}  # the requests held
        self.lost: set[str] = set()  # held when the connection dropped: to claim again
        self.current: str | None = None  # the request typed lines go to
        # The request answered here that ended by itself (the client left, a timeout): the
        # next line was likely typed for it, so it is neither sent nor taken as a command.
        self.ended_under: str | None = None
        self.pending: dict[int, Event] = {}  # commands sent, until acked or refused
        self.quitting = False
        self.stats: Event | None = None  # the server's latest numbers of the queue
        self.prompted: PromptedLines | None = None  # on a terminal: the input line
        # The queue table's height while it is the last thing printed: it is drawn again
        # in place (its countdowns move); 0 once anything else was printed below it.
        self._table_lines = 0
        self.greeted = asyncio.Event()  # the server said hello: the key is an operator's
        self._redraw: asyncio.TimerHandle | None = None
        self._events: dict[str, Callable[[Event], Awaitable[None]]] = {
            "hello": self._on_hello,
            "snapshot": self._on_snapshot,
            "added": self._on_added,
            "claimed": self._on_claimed,
            "released": self._on_released,
            "cancelled": self._on_cancelled,
            "removed": self._on_removed,
            "timed_out": self._on_timed_out,
            "deadline": self._on_deadline,
            "stats": self._on_stats,
            "ack": self._on_ack,
            "refused": self._on_refused,
            "error": self._on_error,
        }
        self._commands: dict[str, Handler] = {
            "claim": self._claim,
            "finish": self._finish,
            "tool": self._tool,
            "reject": self._reject,
            "handoff": self._handoff,
            "release": self._release,
            "queue": self._queue,
            "help": self._help,
            "quit": self._quit,
            "exit": self._quit,
        }

    async def run(self) -> int:
        lines: StdinLines | PromptedLines
        if interactive():
            lines = self.prompted = PromptedLines(self._prompt)
        else:
            lines = StdinLines()
        network = asyncio.create_task(self._stay_connected(), name="llproxy-operator-socket")
        typing = asyncio.create_task(self._take_lines(lines.queue), name="llproxy-operator-input")
        ticking = asyncio.create_task(self._tick(), name="llproxy-operator-countdowns")
        try:
            done, _ = await asyncio.wait({network, typing}, return_when=asyncio.FIRST_COMPLETED)
            return done.pop().result()
        except NotAnOperator as refused:
            self._fail(f"the server refused the key: {str(refused) or 'it is not an operator key'}")
            return EXIT_FAILED
        finally:
            for task in (network, typing, ticking):
                task.cancel()
            await asyncio.gather(network, typing, ticking, return_exceptions=True)
            await self.session.close()
            if self.prompted is not None:
                self.prompted.close()

    # --- the connection ----------------------------------------------------------------------

    async def _stay_connected(self) -> int:
        try:  # the first attempt only: a mistyped URL should not be retried for a minute
            await self.session.connect()
        except CONNECT_ERRORS as exc:
            self._fail(f"cannot reach {self.url}: {_describe(exc)}")
            return EXIT_FAILED
        while True:
            async for event in self.session.events():
                handler = self._events.get(str(event.get("type")))
                if handler is not None:
                    await handler(event)
            self._connection_lost()
            if not await self._reconnect():
                self._fail("gave up reconnecting")
                return EXIT_FAILED

    def _connection_lost(self) -> None:
        # The server gives back the claims of a socket that closed; they are claimed again
        # after the reconnect, and what was typed meanwhile is sent then.
        self.lost |= set(self.answers)
        self.pending.clear()
        code = self.session.close_code
        self._say(f"connection lost (close code {code}); your requests go back to the queue", "red")

    async def _reconnect(self) -> bool:
        for attempt, delay in enumerate(RECONNECT_DELAYS, 1):
            self._say(f"reconnecting in {delay:g}s (attempt {attempt} of {len(RECONNECT_DELAYS)})")
            await asyncio.sleep(delay)
            try:
                await self.session.connect()
                return True
            except CONNECT_ERRORS as exc:
                self._say(f"reconnect failed: {_describe(exc)}", "yellow")
        return False

    async def _send(self, command: Event, unsent: str | None = NOT_CONNECTED) -> None:
        """Send a command; `unsent` is said when there is no connection to send it on."""
        command_id = await self.session.send(command)
        if command_id is not None:
            self.pending[command_id] = command
        elif unsent is not None:
            self._say(unsent, "yellow")

    # --- what the server says ----------------------------------------------------------------

    async def _on_hello(self, event: Event) -> None:
        first = self.me is None
        self.me = str(event.get("operator"))
        self.greeted.set()
        worker = printable(event.get("worker"))
        self._say(f"connected to {self.url} as {printable(self.me)} (worker {worker})", "green")
        if first:
            self._say("type help for the commands", "dim")

    async def _on_snapshot(self, event: Event) -> None:
        self.requests = {}
        for data in event.get("requests") or ():
            if isinstance(data, dict):
                self._known(data)
        await self._claim_lost_again()
        self._queue_changed()

    async def _on_added(self, event: Event) -> None:
        request = self._known(event.get("request") or {}, arriving=True)
        data = request.data
        where = f"{printable(data.get('model'))} from {printable(data.get('client'))}"
        self._say(f"new request #{request.number} for {where}", "" if self.current else "bold")
        self._queue_changed()

    async def _on_claimed(self, event: Event) -> None:
        request = self.requests.get(str(event.get("request")))
        if request is None:
            return
        by = event.get("by")
        request.data.update(state="claimed", operator=by)
        request.deadline_at = None  # the idle timeout runs now, and nobody says how long
        if self.current is None and by != self.me:
            self._say(f"#{request.number} was claimed by {printable(by)}", "dim")
        self._queue_changed()

    async def _on_released(self, event: Event) -> None:
        request = self.requests.get(str(event.get("request")))
        if request is None:
            return
        request.data.update(state="queued", operator=None)
        timeout = request.queue_timeout
        request.deadline_at = None if timeout is None else time.monotonic() + timeout
        if request.id in self.lost:  # our old connection's claim, given back at last
            await self._send({"type": "claim", "request": request.id}, unsent=None)
        self._queue_changed()

    async def _on_cancelled(self, event: Event) -> None:
        self._gone(str(event.get("request")), "the client left: the request is cancelled")

    async def _on_removed(self, event: Event) -> None:
        request_id = str(event.get("request"))
        ours = any(
            c.get("request") == request_id and c.get("type") in ENDING_COMMANDS
            for c in self.pending.values()
        )
        outcome, by = printable(event.get("outcome")), printable(event.get("by"))
        self._gone(request_id, None if ours else f"it ended ({outcome} by {by})")

    async def _on_timed_out(self, event: Event) -> None:
        fallback = event.get("fallback")
        then = f"{printable(fallback)} answers it" if fallback else "the client got an error"
        waited = printable(event.get("waited"))
        self._gone(str(event.get("request")), f"timed out ({waited}): {then}")

    async def _on_deadline(self, event: Event) -> None:
        request = self.requests.get(str(event.get("request")))
        left = event.get("in")
        if request is None or not isinstance(left, int | float):
            return
        request.deadline_at = time.monotonic() + left
        label = f"#{request.number}"
        if request.id in self.answers:
            self._say(f"{label}: {left:.0f}s left: send something or it times out", "bold yellow")
        elif self.current is None:
            self._say(f"{label} times out in {left:.0f}s unless someone claims it", "yellow")

    async def _on_stats(self, event: Event) -> None:
        # Kept for the next drawing of the queue: printed each time, they would bury it.
        self.stats = event

    async def _on_ack(self, event: Event) -> None:
        command = self._answered(event)
        request_id = str(event.get("request"))
        kind = event.get("command")
        if kind == "claim":
            await self._claimed(request_id, event)
        elif kind == "tool_call":
            name = printable(command.get("name"))
            self._say(f"tool call sent: {name} [{printable(event.get('call_id'))}]", "green")
        elif kind == "release":
            self._ended(request_id, "released: it is back in the queue")
        elif kind == "finish":
            self._ended(request_id, f"finished ({printable(event.get('reason'))})")
        elif kind == "reject":
            self._ended(request_id, "rejected: the client got your message")
        elif kind == "handoff":
            self._ended(request_id, f"handed off to {printable(command.get('model'))}")

    async def _on_refused(self, event: Event) -> None:
        self._answered(event)
        request_id, reason = str(event.get("request")), printable(event.get("reason"))
        command = printable(event.get("command"))
        if command == "claim" and request_id in self.lost:
            if reason == f"claimed by {self.me}":
                return  # our old connection still holds it: `released` comes when it goes
            self._drop(request_id)
        self._say(f"{command} {self._label(request_id)} refused: {reason}", "bold red")

    def _answered(self, event: Event) -> Event:
        """The command an ack or a refusal answers (it is no longer pending)."""
        command_id = event.get("id")
        return (self.pending.pop(command_id, None) if isinstance(command_id, int) else None) or {}

    async def _on_error(self, event: Event) -> None:
        self._say(f"the server says: {printable(event.get('message'))}", "red")

    # --- requests held -----------------------------------------------------------------------

    async def _claimed(self, request_id: str, ack: Event) -> None:
        came_back = request_id in self.lost
        self.lost.discard(request_id)
        self.answers.setdefault(request_id, Answer())
        await self._catch_up(request_id, str(ack.get("text") or ""))
        if came_back:
            self._say(f"{self._label(request_id)} is yours again", "green")
            return
        self.current = request_id
        request = self.requests.get(request_id)
        if request is not None:
            self._print(conversation(request))
        if ack.get("text") or ack.get("tool_calls"):
            self._print(answer_so_far(str(ack.get("text") or ""), ack.get("tool_calls") or ()))
        self._say(
            f"answering {self._label(request_id)}: each line you type is sent at once; "
            "/finish when done, /help for the commands",
            "bold",
        )

    async def _catch_up(self, request_id: str, sent: str) -> None:
        """Make the server's text and ours agree: what was typed while the connection was
        down is sent now (the offset makes a resent part harmless); else the server's text,
        which another operator may have begun, is where typing goes on."""
        answer = self.answers[request_id]
        if answer.text.startswith(sent) and len(answer.text) > len(sent):
            rest = answer.text[len(sent) :]
            delta = {"type": "delta", "request": request_id, "text": rest, "offset": len(sent)}
            await self._send(delta, unsent=None)  # not sent: the next reconnect tries again
        else:
            answer.text = sent

    async def _claim_lost_again(self) -> None:
        for request_id in list(self.lost):
            request = self.requests.get(request_id)
            holder = request.data.get("operator") if request is not None else None
            if request is None:
                self._drop(request_id)
                self._say(f"{self._label(request_id)} ended while you were away", "bold yellow")
            elif holder is None:
                await self._send({"type": "claim", "request": request_id}, unsent=None)
            elif holder != self.me:
                self._drop(request_id)
                held_by = f"is now held by {printable(holder)}"
                self._say(f"{self._label(request_id)} {held_by}", "bold yellow")

    def _gone(self, request_id: str, why: str | None) -> None:
        """A request left the desk: why, or None when our own command ended it (its ack
        says so)."""
        self.requests.pop(request_id, None)
        if why is not None and request_id in self.answers:
            if self.current == request_id:
                self.ended_under = request_id
            self._drop(request_id)
            self._say(f"{self._label(request_id)}: {why}", "bold yellow")
        elif why is not None and self.current is None:
            self._say(f"{self._label(request_id)}: {why}", "dim")
        self._queue_changed()

    def _ended(self, request_id: str, message: str) -> None:
        self._drop(request_id)
        self._say(f"{self._label(request_id)} {message}", "green")
        self._queue_changed()

    def _drop(self, request_id: str) -> None:
        self.answers.pop(request_id, None)
        self.lost.discard(request_id)
        if self.current == request_id:
            self.current = None

    # --- what the operator types -------------------------------------------------------------

    async def _take_lines(self, lines: asyncio.Queue[str | None]) -> int:
        while not self.quitting and (line := await lines.get()) is not None:
            self._table_lines = 0  # the line typed is echoed below the table
            await self._line(line)
        # Input that ends at once (a pipe, /dev/null) must not hide a refused key or an
        # unreachable server: their failure, not this, decides how the terminal exits.
        await self.greeted.wait()
        if self.answers:
            self._say("leaving: the requests you hold go back to the queue")
        return EXIT_OK

    async def _line(self, line: str) -> None:
        if self.current is None and self.ended_under is not None and line.strip():
            label, self.ended_under = self._label(self.ended_under), None
            self._say(
                f"{label} had ended: this line was not sent, nor taken as a command "
                "(type it again if it is one)",
                "yellow",
            )
            return
        self.ended_under = None
        if self.current is not None and not line.startswith("/"):
            await self._type(line)
        elif self.current is not None and line.startswith("//"):
            await self._type(line[1:])
        else:
            await self._command(line.strip().removeprefix("/"))

    async def _type(self, line: str) -> None:
        """One line of the answer, to the client at once. Lines are joined by newlines: the
        first has none before it, and the answer never ends with one, for empty lines wait
        to go with the next line (empty lines before any text are dropped)."""
        request_id = self.current
        assert request_id is not None
        answer = self.answers[request_id]
        if not line:
            answer.empty_lines += 1 if answer.text else 0
            return
        offset = len(answer.text)
        text = "\n" * (answer.empty_lines + 1) + line if answer.text else line
        answer.text, answer.empty_lines = answer.text + text, 0
        if request_id in self.lost:
            self._say(KEPT, "dim")
            return
        delta = {"type": "delta", "request": request_id, "text": text, "offset": offset}
        await self._send(delta, unsent=KEPT)

    async def _command(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word.isdigit() and not rest.strip():  # "2 apples" is no command
            word, rest = "claim", word
        handler = self._commands.get(word.lower())
        if handler is not None:
            await handler(rest.strip())
        elif word:
            self._say(f"unknown command {printable(word)!r}: type help", "yellow")

    def _held(self) -> str | None:
        """The request a command is about, or None (and why) when there is none to act on."""
        if self.current is None:
            self._say("you are answering no request: type a number to claim one", "yellow")
        elif self.current in self.lost:
            label = self._label(self.current)
            self._say(f"{label} is not yours again yet: wait for the reconnect", "yellow")
        else:
            return self.current
        return None

    async def _claim(self, args: str) -> None:
        number = int(args) if args.isdigit() else None
        request_id = next((r.id for r in self.requests.values() if r.number == number), None)
        if request_id is None:
            self._say(f"no request {printable(args) or 'number'} in the queue: claim N", "yellow")
            return
        await self._send({"type": "claim", "request": request_id})

    async def _finish(self, args: str) -> None:
        if (request_id := self._held()) is not None:
            reason = {"reason": args} if args else {}
            await self._send({"type": "finish", "request": request_id, **reason})

    async def _tool(self, args: str) -> None:
        request_id = self._held()
        name, _, raw = args.partition(" ")
        arguments = _json_object(raw.strip() or "{}")
        if request_id is None:
            return
        if not name or isinstance(arguments, str):
            problem = f": {arguments}" if isinstance(arguments, str) else ""
            self._say(f"usage: /tool NAME {{json arguments}}{problem}", "yellow")
            return
        command = {"type": "tool_call", "request": request_id, "name": name, "arguments": arguments}
        await self._send(command)

    async def _reject(self, args: str) -> None:
        if (request_id := self._held()) is not None:
            await self._send({"type": "reject", "request": request_id, "message": args})

    async def _handoff(self, args: str) -> None:
        request_id = self._held()
        model, _, mode = args.partition(" ")
        if request_id is None:
            return
        if not model:
            self._say("usage: /handoff MODEL [replace|continue]", "yellow")
            return
        # Replace is all the server allows before any text, continue all it allows after.
        mode = mode.strip() or ("continue" if self.answers[request_id].text else "replace")
        await self._send({"type": "handoff", "request": request_id, "model": model, "mode": mode})

    async def _release(self, args: str) -> None:
        if (request_id := self._held()) is not None:
            await self._send({"type": "release", "request": request_id})

    async def _queue(self, args: str) -> None:
        self.current = None
        self._draw_queue()

    async def _help(self, args: str) -> None:
        table = Table(show_header=False, box=None)
        for command, text in HELP:
            table.add_row(Text(command, style="bold"), text)
        self._print(table)

    async def _quit(self, args: str) -> None:
        self.quitting = True

    # --- the queue ---------------------------------------------------------------------------

    def _known(self, data: Event, arriving: bool = False) -> QueuedRequest:
        request_id = str(data.get("id"))
        number = self.numbers.setdefault(request_id, len(self.numbers) + 1)
        left = data.get("deadline_in")
        seconds = float(left) if isinstance(left, int | float) else None
        deadline = None if seconds is None else time.monotonic() + seconds
        request = QueuedRequest(number, data, deadline, seconds if arriving else None)
        self.requests[request_id] = request
        return request

    def _label(self, request_id: str) -> str:
        number = self.numbers.get(request_id)
        return f"#{number}" if number is not None else printable(request_id)

    def _queue_changed(self) -> None:
        if self.current is None and self._redraw is None:
            loop = asyncio.get_running_loop()
            self._redraw = loop.call_later(REDRAW_SECONDS, self._draw_queue)

    def _draw_queue(self) -> None:
        if self._redraw is not None:
            self._redraw.cancel()
            self._redraw = None
        if self.current is None:
            self._print_table(queue_table(self.requests.values(), self.me, self.stats))

    def _print_table(self, table: Table) -> None:
        """The queue on a terminal: in place of the last one when nothing came after it
        and it fits the screen; else printed below, as on a pipe."""
        if self.prompted is None:
            self.out.print(table)
            return
        with self.out.capture() as captured:
            self.out.print(table)
        text = captured.get()
        replacing = self._table_lines if self._table_lines < self.out.height - 2 else 0
        self.prompted.above(lambda: self._write(text), replacing)
        self._table_lines = text.count("\n")

    def _write(self, text: str) -> None:
        self.out.file.write(text)
        self.out.file.flush()

    async def _tick(self) -> None:
        """Once a second the queue on screen is drawn again: its countdowns move."""
        while True:
            await asyncio.sleep(1.0)
            fits = 0 < self._table_lines < self.out.height - 2  # else it would scroll
            if self.prompted is not None and self.current is None and fits:
                self._draw_queue()

    def _say(self, text: str, style: str = "") -> None:
        self._print(Text(text, style=style))

    def _print(self, renderable: RenderableType) -> None:
        """Output, above the line being typed on a terminal (never over it)."""
        self._table_lines = 0  # the table is no longer the last thing on screen
        if self.prompted is None:
            self.out.print(renderable)
        else:
            self.prompted.above(lambda: self.out.print(renderable))

    def _prompt(self) -> str:
        """The mode, and what Enter does in it."""
        request_id = self.current
        if request_id is None:
            return "queue · N + Enter claims #N, help lists commands > "
        label = self._label(request_id)
        if request_id in self.lost:
            return f"answering {label} · reconnecting: Enter keeps the line > "
        return f"answering {label} · Enter sends the line, /finish ends > "

    def _fail(self, text: str) -> None:
        message = Text(f"llproxy: {text}", style="bold red")
        if self.prompted is None:
            self.err.print(message)
        else:  # the last words: on a line of their own, no prompt after them
            self.prompted.above(lambda: self.err.print(message), redraw=False)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _json_object(text: str) -> dict[str, Any] | str:
    """The object the text holds, or what is wrong with it."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return f"the arguments are not JSON ({exc})"
    return value if isinstance(value, dict) else "the arguments must be a JSON object"
