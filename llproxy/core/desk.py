"""The operator desk: requests waiting for a person to answer them as a model, and the
people answering them. One authority holds it (a process serving alone, or a host's
master); it is driven by plain messages and tells its links what happens, so it can sit
behind a channel, or later a shared store, unchanged.

A request (ticket) is queued, claimed by one operator (a lease renewed by every action),
answered with text deltas and tool calls, then finished; or it ends rejected, handed off
to a model, timed out, or cancelled because its client left.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

log = logging.getLogger("llproxy.desk")

PROTOCOL = 1
QUEUED, CLAIMED, ANSWERING = "queued", "claimed", "answering"
FINISH_REASONS = ("stop", "length", "tool_calls")
# A deadline warning goes out this long before a deadline (or at a quarter of a short one).
WARN_SECONDS = 30.0
TICK_SECONDS = 0.5  # how often the holder's clock looks at the deadlines
STATS_SECONDS = 5.0  # how often operators are told the queue's numbers

Event = dict[str, Any]
Send = Callable[[Event], None]


@dataclass
class Ticket:
    """One request for an operator: what the client asked, and the answer so far."""

    id: str
    model: str  # the registry model (human:support)
    asked: str  # the name the client used
    client: str
    dialect: str
    stream: bool
    messages: list[Any]
    tools: list[Any]
    tool_choice: Any
    max_tokens: int | None
    queue_timeout: float
    idle_timeout: float
    fallback: str | None
    # What the answer may carry (its text and tool calls, in UTF-8): the desk holds every
    # answer whole until it ends.
    max_answer_bytes: int
    worker: int = 0  # the serving process that holds the client's request
    # Tools whose schema cannot check a call (found when the request arrived): why.
    tool_problems: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    state: str = QUEUED
    operator: str | None = None  # who holds the claim
    conn: str | None = None  # the connection that holds it
    # What reached the client, in order: pieces joined only when the whole is asked for,
    # so appending stays linear in the answer's size.
    parts: list[str] = field(default_factory=list)
    length: int = 0  # characters in parts
    answer_bytes: int = 0  # UTF-8 bytes of the text and the tool calls
    tool_calls: list[Event] = field(default_factory=list)
    deadline: float = 0.0  # monotonic
    warned: bool = False

    @property
    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    def add_answer_bytes(self, size: int) -> None:
        """Count `size` more bytes of the answer; Refused past the bound."""
        if self.answer_bytes + size > self.max_answer_bytes:
            raise Refused(
                f"the answer would exceed {self.max_answer_bytes} bytes "
                f"({self.answer_bytes} sent): finish it here"
            )
        self.answer_bytes += size

    def add_text(self, new: str) -> None:
        """Text that reaches the client; Refused past the bound."""
        self.add_answer_bytes(len(new.encode(errors="surrogatepass")))
        self.parts.append(new)
        self.length += len(new)

    def add_call(self, call: Event) -> None:
        """A tool call (`id`, `name`, `arguments` as JSON text) that reaches the client;
        Refused past the bound."""
        name, arguments = call["name"], call["arguments"]
        self.add_answer_bytes(len(arguments.encode()) + len(name.encode(errors="surrogatepass")))
        self.tool_calls.append(call)

    def public(self, now: float) -> Event:
        """The ticket as operators see it."""
        return {
            "id": self.id,
            "model": self.model,
            "asked": self.asked,
            "client": self.client,
            "dialect": self.dialect,
            "stream": self.stream,
            "worker": self.worker,
            "created": self.created,
            "state": self.state,
            "operator": self.operator,
            "deadline_in": round(max(0.0, self.deadline - now), 1),
            "messages": self.messages,
            "tools": self.tools,
            "tool_problems": self.tool_problems,
            "tool_choice": self.tool_choice,
            "max_tokens": self.max_tokens,
            "text": self.text,
            "tool_calls": self.tool_calls,
        }

    def chosen_tool(self) -> str | None:
        """The one tool the request's tool_choice names, if it names one."""
        choice = self.tool_choice
        function = choice.get("function") if isinstance(choice, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        return name if isinstance(name, str) else None

    def tool_named(self, name: str) -> Mapping[str, Any] | None:
        for tool in self.tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and function.get("name") == name:
                return function
        return None


def new_ticket_id() -> str:
    return "req_" + secrets.token_hex(8)


@dataclass
class Operator:
    conn: str
    name: str
    models: tuple[str, ...]  # globs; empty: every operator model
    send: Send

    def sees(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, glob) for glob in self.models)


class DeskObserver(Protocol):
    """What counts the desk's work (the metrics): told of each claim and each end."""

    def claimed(self, ticket: Ticket) -> None: ...

    def ended(self, ticket: Ticket, outcome: str) -> None:
        """outcome: done, rejected, handed off, timed out, cancelled."""


class Refused(Exception):
    """A command the desk will not carry out; the message says why."""


class DeskPort(Protocol):
    """How a serving process reaches the desk: the same calls whether the desk is in this
    process (the Desk itself) or behind a channel. What the desk says comes back through
    the `send` given."""

    def start(self) -> None: ...

    async def close(self) -> None: ...

    def submit(self, ticket: Ticket, send: Send) -> None: ...

    def withdraw(self, ticket_id: str, reason: str = "client left") -> None: ...

    def attach(self, conn: str, name: str, models: tuple[str, ...], send: Send) -> None: ...

    def detach(self, conn: str) -> None: ...

    def command(self, conn: str, command: Event) -> None: ...


class Desk:
    """The authority. Every method runs to completion in its event loop; `tick` is called
    about twice a second for the deadlines."""

    def __init__(
        self,
        exists: Callable[[str], bool] = lambda name: True,
        clock: Callable[[], float] = time.monotonic,
        observer: DeskObserver | None = None,
    ) -> None:
        self.exists = exists  # whether a model name can take a handoff
        self.clock = clock
        self.observer = observer
        self._stats_due = 0.0
        self.tickets: dict[str, Ticket] = {}
        self.clients: dict[str, Send] = {}
        self.operators: dict[str, Operator] = {}
        self._commands: dict[str, Callable[[Operator, Ticket, Event], Event | None]] = {
            "claim": self._claim,
            "release": self._release_command,
            "delta": self._delta,
            "tool_call": self._tool_call,
            "finish": self._finish,
            "reject": self._reject,
            "handoff": self._handoff,
        }

    # --- the client's side ---------------------------------------------------------------

    def submit(self, ticket: Ticket, send: Send) -> None:
        ticket.deadline = self.clock() + ticket.queue_timeout
        self.tickets[ticket.id] = ticket
        self.clients[ticket.id] = send
        self._tell(ticket, {"type": "added", "request": ticket.public(self.clock())})

    def withdraw(self, ticket_id: str, reason: str = "client left") -> None:
        """The client left (or its process retired): the request is gone, and its
        operator is told at once."""
        ticket = self._remove(ticket_id)
        if ticket is not None:
            self._observe_end(ticket, "cancelled")
            self._tell(ticket, {"type": "cancelled", "request": ticket.id, "reason": reason})

    # --- the operators' side -------------------------------------------------------------

    def attach(self, conn: str, name: str, models: tuple[str, ...], send: Send) -> None:
        operator = Operator(conn, name, models, send)
        self.operators[conn] = operator
        now = self.clock()
        visible = [t for t in self.tickets.values() if operator.sees(t.model)]
        send(
            {
                "type": "snapshot",
                "protocol": PROTOCOL,
                "operator": name,
                "requests": [t.public(now) for t in visible],
                "claims": [t.id for t in visible if t.operator == name],
            }
        )
        self._send_stats()

    def detach(self, conn: str) -> None:
        """An operator left: their claims go back to the queue; what they sent stays sent."""
        operator = self.operators.pop(conn, None)
        if operator is None:
            return
        for ticket in list(self.tickets.values()):
            if ticket.conn == conn:
                self._release(ticket, "operator left")

    def command(self, conn: str, command: Event) -> None:
        operator = self.operators.get(conn)
        if operator is None:
            return
        name = command.get("type")
        reply: Event = {"id": command.get("id"), "command": name}
        if isinstance(command.get("request"), str):
            reply["request"] = command["request"]
        try:
            if name not in self._commands:
                known = ", ".join(self._commands)
                raise Refused(f"unknown command {name!r}; known: {known}")
            ticket = self._ticket(operator, command.get("request"))
            extra = self._commands[name](operator, ticket, command)
        except Refused as refused:
            operator.send({"type": "refused", **reply, "reason": str(refused)})
            return
        except Exception as exc:
            # The desk serves every operator and client of the host: one command it
            # trips over is refused, and the desk goes on.
            log.exception("desk command %r failed", name)
            reason = f"the desk could not carry this out ({type(exc).__name__})"
            operator.send({"type": "refused", **reply, "reason": reason})
            return
        if ticket.id in self.tickets:  # its deadline, which the command may have renewed
            reply["deadline_in"] = self._left(ticket)
        operator.send({"type": "ack", **reply, **(extra or {})})

    # --- time ------------------------------------------------------------------------------

    def tick(self) -> None:
        now = self.clock()
        if now >= self._stats_due:
            self._stats_due = now + STATS_SECONDS
            self._send_stats()
        for ticket in list(self.tickets.values()):
            left = ticket.deadline - now
            if left <= 0:
                self._time_out(ticket)
                continue
            timeout = ticket.queue_timeout if ticket.state == QUEUED else ticket.idle_timeout
            # At least one tick before: a shorter window could fall between two ticks.
            if not ticket.warned and left <= min(WARN_SECONDS, max(timeout / 4, TICK_SECONDS)):
                ticket.warned = True
                self._tell(
                    ticket,
                    {"type": "deadline", "request": ticket.id, "in": round(left, 1)},
                    only_holder=ticket.conn is not None,
                )

    # --- commands --------------------------------------------------------------------------

    def _claim(self, operator: Operator, ticket: Ticket, command: Event) -> Event:
        # The same operator may take a claim over from another connection of theirs: one
        # that reconnects must not wait until the server notices the old socket is dead.
        if ticket.conn is not None and ticket.operator != operator.name:
            raise Refused(f"claimed by {ticket.operator}")
        if ticket.conn != operator.conn:
            ticket.state = ANSWERING if ticket.length or ticket.tool_calls else CLAIMED
            ticket.operator, ticket.conn = operator.name, operator.conn
            self._renew(ticket)
            if self.observer is not None:
                self.observer.claimed(ticket)
            claimed = {"request": ticket.id, "by": operator.name, "deadline_in": self._left(ticket)}
            self._tell(ticket, {"type": "claimed", **claimed})
            self.clients[ticket.id]({"type": "claimed", "by": operator.name})
        # The answer so far: another operator, or this one before a reconnect, may have
        # begun it.
        return {"text": ticket.text, "tool_calls": ticket.tool_calls}

    def _release(self, ticket: Ticket, reason: str) -> None:
        by = ticket.operator
        ticket.state, ticket.operator, ticket.conn = QUEUED, None, None
        ticket.deadline, ticket.warned = self.clock() + ticket.queue_timeout, False
        released = {
            "request": ticket.id,
            "by": by,
            "reason": reason,
            "deadline_in": self._left(ticket),
        }
        self._tell(ticket, {"type": "released", **released})

    def _held(self, operator: Operator, ticket: Ticket) -> None:
        if ticket.conn != operator.conn:
            raise Refused(
                f"claimed by {ticket.operator}" if ticket.conn else "claim the request first"
            )

    def _release_command(self, operator: Operator, ticket: Ticket, command: Event) -> None:
        self._held(operator, ticket)
        self._release(ticket, "released")

    def _delta(self, operator: Operator, ticket: Ticket, command: Event) -> Event:
        self._held(operator, ticket)
        text, offset = command.get("text"), command.get("offset", ticket.length)
        if not isinstance(text, str):
            raise Refused("text: a string is needed")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise Refused("offset: a count of characters is needed")
        if offset > ticket.length:
            raise Refused(
                f"offset {offset} is past the {ticket.length} characters sent: resend from there"
            )
        # Append-only: what overlaps the text already sent (a resent delta) is dropped.
        new = text[ticket.length - offset :]
        if new:
            ticket.add_text(new)
            ticket.state = ANSWERING
            self.clients[ticket.id]({"type": "delta", "text": new})
        self._renew(ticket)
        return {"length": ticket.length}

    def _tool_call(self, operator: Operator, ticket: Ticket, command: Event) -> Event:
        self._held(operator, ticket)
        name, arguments = command.get("name"), command.get("arguments", {})
        tool = ticket.tool_named(name) if isinstance(name, str) else None
        if tool is None:
            offered = [
                t["function"].get("name")
                for t in ticket.tools
                if isinstance(t, dict) and isinstance(t.get("function"), dict)
            ]
            raise Refused(f"no tool {name!r} in this request; it offers {offered}")
        if ticket.tool_choice == "none":
            raise Refused("the request's tool_choice is none: answer with text")
        chosen = ticket.chosen_tool()
        if chosen is not None and name != chosen:
            raise Refused(f"the request's tool_choice names {chosen!r}: call that tool")
        if not isinstance(arguments, dict):
            raise Refused("arguments: an object is needed")
        if name in ticket.tool_problems:
            raise Refused(ticket.tool_problems[name])
        schema = tool.get("parameters")
        if isinstance(schema, dict):
            check_arguments(schema, arguments)
        encoded = orjson.dumps(arguments).decode()
        call = {"id": "call_" + secrets.token_hex(8), "name": name, "arguments": encoded}
        ticket.add_call(call)
        ticket.state = ANSWERING
        self.clients[ticket.id]({"type": "tool_call", **call})
        self._renew(ticket)
        return {"call_id": call["id"]}

    def _finish(self, operator: Operator, ticket: Ticket, command: Event) -> Event:
        self._held(operator, ticket)
        reason = command.get("reason") or ("tool_calls" if ticket.tool_calls else "stop")
        if reason not in FINISH_REASONS:
            raise Refused(f"reason: one of {', '.join(FINISH_REASONS)}")
        # What the client is told must hold: tool_calls with no call, or a required tool
        # call never made, would reach it as an answer that is not one.
        if reason == "tool_calls" and not ticket.tool_calls:
            raise Refused("reason tool_calls: call a tool first (or finish with stop)")
        if not ticket.tool_calls and (
            ticket.tool_choice == "required" or ticket.chosen_tool() is not None
        ):
            raise Refused("the request's tool_choice requires a tool call: call one first")
        self._end(ticket, {"type": "finish", "reason": reason}, "done", operator.name)
        return {"reason": reason}

    def _reject(self, operator: Operator, ticket: Ticket, command: Event) -> None:
        if ticket.conn is not None:
            self._held(operator, ticket)
        message = command.get("message")
        message = message if isinstance(message, str) and message else "rejected by the operator"
        self._end(ticket, {"type": "reject", "message": message}, "rejected", operator.name)

    def _handoff(self, operator: Operator, ticket: Ticket, command: Event) -> None:
        if ticket.conn is not None:
            self._held(operator, ticket)
        model, mode = command.get("model"), command.get("mode", "replace")
        if not isinstance(model, str) or not self.exists(model):
            raise Refused(f"model: no model {model!r} to hand off to")
        if mode not in ("replace", "continue"):
            raise Refused("mode: replace or continue")
        if mode == "replace" and (ticket.length or ticket.tool_calls):
            raise Refused("text has reached the client already: hand off with mode continue")
        if mode == "continue" and ticket.tool_calls:
            raise Refused("a model cannot continue after tool calls: finish instead")
        event = {"type": "handoff", "model": model, "mode": mode, "text": ticket.text}
        self._end(ticket, event, "handed off", operator.name)

    # --- helpers ---------------------------------------------------------------------------

    def _ticket(self, operator: Operator, ticket_id: Any) -> Ticket:
        ticket = self.tickets.get(ticket_id) if isinstance(ticket_id, str) else None
        if ticket is None or not operator.sees(ticket.model):
            raise Refused(f"no request {ticket_id!r} (it ended, or never was)")
        return ticket

    def _left(self, ticket: Ticket) -> float:
        """Seconds to the ticket's deadline, as operators are told it."""
        return round(max(0.0, ticket.deadline - self.clock()), 1)

    def _renew(self, ticket: Ticket) -> None:
        ticket.deadline, ticket.warned = self.clock() + ticket.idle_timeout, False

    def _end(self, ticket: Ticket, to_client: Event, outcome: str, by: str | None) -> None:
        send = self.clients.get(ticket.id)
        self._remove(ticket.id)
        self._observe_end(ticket, outcome)
        if send is not None:
            send(to_client)
        self._tell(ticket, {"type": "removed", "request": ticket.id, "outcome": outcome, "by": by})

    def _time_out(self, ticket: Ticket) -> None:
        waited = "queue_timeout" if ticket.state == QUEUED else "idle_timeout"
        event = {"waited": waited, "fallback": ticket.fallback}
        send = self.clients.get(ticket.id)
        self._remove(ticket.id)
        self._observe_end(ticket, "timed out")
        if send is not None:
            send({"type": "timeout", **event, "text": ticket.text})
        self._tell(ticket, {"type": "timed_out", "request": ticket.id, **event})

    def _observe_end(self, ticket: Ticket, outcome: str) -> None:
        if self.observer is not None:
            self.observer.ended(ticket, outcome)

    def operators_online(self) -> int:
        """People, not sockets: one operator on two tabs is one."""
        return len({operator.name for operator in self.operators.values()})

    def _send_stats(self) -> None:
        """Each operator hears the numbers of the queue they see: how many wait unclaimed,
        the oldest's wait (wall-clock seconds since it arrived), who is online."""
        if not self.operators:
            return
        online, wall = self.operators_online(), time.time()
        queued = [t for t in self.tickets.values() if t.state == QUEUED]
        for operator in list(self.operators.values()):
            seen = [t for t in queued if operator.sees(t.model)]
            oldest = max((wall - t.created for t in seen), default=0.0)
            operator.send(
                {
                    "type": "stats",
                    "waiting": len(seen),
                    "oldest_wait": round(max(0.0, oldest), 1),
                    "operators_online": online,
                }
            )

    def _remove(self, ticket_id: str) -> Ticket | None:
        self.clients.pop(ticket_id, None)
        return self.tickets.pop(ticket_id, None)

    def _tell(self, ticket: Ticket, event: Event, only_holder: bool = False) -> None:
        for operator in list(self.operators.values()):
            if operator.sees(ticket.model) and (not only_holder or operator.conn == ticket.conn):
                operator.send(event)


def tool_problems(tools: list[Any]) -> dict[str, str]:
    """Why each tool whose schema cannot be used cannot be called: worked out where the
    client's request arrives, so the desk refuses such calls at once and operators see it."""
    schemas = {
        function["name"]: function["parameters"]
        for tool in tools
        if isinstance(tool, dict)
        and isinstance(function := tool.get("function"), dict)
        and isinstance(function.get("name"), str)
        and isinstance(function.get("parameters"), dict)
    }
    # jsonschema and RE2 (4.6 MB) are imported once a request for a person brings tools.
    from .toolschema import schema_problems

    return schema_problems(schemas)


def check_arguments(schema: dict[str, Any], arguments: dict[str, Any]) -> None:
    """Refused when the arguments do not fit the tool's JSON Schema (any draft), or the
    schema cannot be checked safely (core/toolschema.py)."""
    from .toolschema import SchemaRefusal, check

    try:
        check(schema, arguments)
    except SchemaRefusal as refusal:
        raise Refused(str(refusal)) from None


class HeldDesk(Desk):
    """The desk in the process that holds it, with its clock task: a process serving
    alone, or a host's master."""

    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llproxy-desk")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self.tick()
            except Exception:  # the clock must keep running for every other ticket
                log.exception("the desk's clock tick failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
