"""The operators' desk across processes: the supervisor holds it (one authority per host,
like the rate table), each worker reaches it over its channel. A client's request and
the operator answering it usually sit in different workers; the desk's events find each
where it is."""

from __future__ import annotations

from collections.abc import Callable

from ..core.desk import DeskPort, Event, Send, Ticket
from .channel import (
    DeskAttach,
    DeskCommand,
    DeskDetach,
    DeskMessage,
    DeskSubmit,
    DeskToClient,
    DeskToOperator,
    DeskWithdraw,
    Message,
)

# The events after which a ticket's client hears nothing more.
ENDINGS = frozenset({"finish", "reject", "handoff", "timeout"})


class ChannelDesk:
    """A worker's port to the desk its supervisor holds."""

    def __init__(self, send: Callable[[Message], bool]) -> None:
        self.send = send
        self.clients: dict[str, Send] = {}
        self.operators: dict[str, Send] = {}

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def submit(self, ticket: Ticket, send: Send) -> None:
        self.clients[ticket.id] = send
        if not self.send(DeskSubmit(ticket)):
            self.clients.pop(ticket.id, None)
            send({"type": "timeout", "waited": "queue_timeout", "fallback": None, "text": ""})

    def withdraw(self, ticket_id: str, reason: str = "client left") -> None:
        if self.clients.pop(ticket_id, None) is not None:
            self.send(DeskWithdraw(ticket_id, reason))

    def attach(self, conn: str, name: str, models: tuple[str, ...], send: Send) -> None:
        self.operators[conn] = send
        self.send(DeskAttach(conn, name, models))

    def detach(self, conn: str) -> None:
        if self.operators.pop(conn, None) is not None:
            self.send(DeskDetach(conn))

    def command(self, conn: str, command: Event) -> None:
        self.send(DeskCommand(conn, command))

    def deliver(self, message: DeskToClient | DeskToOperator) -> None:
        """An event from the desk, to whoever it is for in this worker."""
        if isinstance(message, DeskToClient):
            ending = message.event.get("type") in ENDINGS
            send = self.clients.pop(message.ticket_id, None) if ending else None
            send = send or self.clients.get(message.ticket_id)
            if send is not None:
                send(message.event)
        elif (operator := self.operators.get(message.conn)) is not None:
            operator(message.event)


class DeskHost:
    """The supervisor's end: messages from workers to the desk, its events back to the
    worker each is for; a worker that exits takes its clients and operators with it. The
    holder of a fleet's desk relays its hosts the same way (`process/fleet.py`), a sender
    then being a host."""

    def __init__(self, desk: DeskPort) -> None:
        self.desk = desk
        self.tickets: dict[int | str, set[str]] = {}
        self.conns: dict[int | str, set[str]] = {}

    def handle(
        self, worker_id: int | str, send: Callable[[Message], bool], message: DeskMessage
    ) -> None:
        tickets = self.tickets.setdefault(worker_id, set())
        conns = self.conns.setdefault(worker_id, set())
        match message:
            case DeskSubmit(ticket):
                tickets.add(ticket.id)

                def to_client(event: Event, ticket_id: str = ticket.id) -> None:
                    if event.get("type") in ENDINGS:
                        tickets.discard(ticket_id)
                    send(DeskToClient(ticket_id, event))

                self.desk.submit(ticket, to_client)
            case DeskWithdraw(ticket_id, reason):
                tickets.discard(ticket_id)
                self.desk.withdraw(ticket_id, reason)
            case DeskAttach(conn, name, models):
                conns.add(conn)

                def to_operator(event: Event, conn: str = conn) -> None:
                    send(DeskToOperator(conn, event))

                self.desk.attach(conn, name, models, to_operator)
            case DeskDetach(conn):
                conns.discard(conn)
                self.desk.detach(conn)
            case DeskCommand(conn, command):
                self.desk.command(conn, command)

    def worker_gone(
        self, worker_id: int | str, reason: str = "the process holding the client's request exited"
    ) -> None:
        for ticket_id in self.tickets.pop(worker_id, set()):
            self.desk.withdraw(ticket_id, reason)
        for conn in self.conns.pop(worker_id, set()):
            self.desk.detach(conn)
