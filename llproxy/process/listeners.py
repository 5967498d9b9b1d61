"""The sockets the workers accept on: one per worker slot with SO_REUSEPORT, or one shared.

Per slot (the default where the platform has SO_REUSEPORT), the kernel hashes each new
connection to one worker's queue instead of letting the first worker to wake take every
pending one. The master binds each slot's socket without listening (so it never takes a
share itself) and keeps it open; the slot's worker listens when it serves. A worker that
retires on reload or dies hands its slot, queue included, to its successor, so no queued
connection is reset; only a slot that goes away (fewer workers) closes its queue.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Collection
from pathlib import Path

log = logging.getLogger("llproxy.listeners")

# Every listen() on a socket sets its queue length; workers pass the same one (aiohttp's
# default of 128 would silently shorten the master's).
BACKLOG = 2048
MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def reuse_port_supported() -> bool:
    if not hasattr(socket, "SO_REUSEPORT"):
        return False
    with socket.socket() as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        except OSError:
            return False
    return True


def migrate_req() -> str | None:
    """The kernel's `net.ipv4.tcp_migrate_req` ("0" or "1"), or None where it has none."""
    try:
        return MIGRATE_REQ.read_text().strip()
    except OSError:
        return None


class Listeners:
    """The master's listening sockets, by worker slot."""

    def __init__(self, bindip: str, port: int, reuse_port: bool) -> None:
        self.address = (bindip, port)
        self.family = socket.AF_INET6 if ":" in bindip else socket.AF_INET
        self.per_worker = reuse_port and reuse_port_supported()
        if reuse_port and not self.per_worker:
            log.warning("SO_REUSEPORT is unavailable here: the workers share one socket")
        self._slots: dict[int, socket.socket] = {}
        self._shared: socket.socket | None = None

    def open(self) -> None:
        """Bind the first slot (or the shared socket) now, so a bad or busy address fails
        before any worker starts; raises OSError."""
        if not self.per_worker:
            self._shared = self._bind(reuse_port=False)
            self._shared.listen(BACKLOG)
            return
        # The slots' SO_REUSEPORT would let them join another process's group on this port
        # (another llproxy left running): a plain bind first fails on a port in use.
        self._bind(reuse_port=False).close()
        self.listener(0)
        log.debug(
            "one listening socket per worker (SO_REUSEPORT); net.ipv4.tcp_migrate_req=%s",
            migrate_req() or "absent",
        )

    def listener(self, slot: int) -> socket.socket:
        """The socket of this slot, bound now if it is new."""
        if not self.per_worker:
            assert self._shared is not None, "open() first"
            return self._shared
        if slot not in self._slots:
            self._slots[slot] = self._bind(reuse_port=True)
        return self._slots[slot]

    def free(self, taken: Collection[int], count: int) -> list[int]:
        """The lowest `count` slots no worker in `taken` holds."""
        free: list[int] = []
        slot = 0
        while len(free) < count:
            if slot not in taken:
                free.append(slot)
            slot += 1
        return free

    def keep_only(self, held: Collection[int]) -> None:
        """Close the slots no serving worker holds (the worker count went down). The last
        close drops the connections queued on that slot, unless the kernel moves them to
        another worker (`net.ipv4.tcp_migrate_req=1`); the retiring worker first takes in
        what is queued, which leaves only connections arriving in that very instant."""
        gone = [s for s in self._slots if s not in held]
        for slot in gone:
            self._slots.pop(slot).close()
        if gone and migrate_req() != "1":
            # What the operator gets from the kernel; llproxy does not change sysctls.
            log.info(
                "closing the listening socket of %d retired worker slot(s): a connection "
                "arriving there as it closes is reset; net.ipv4.tcp_migrate_req=1 (now %s) "
                "has the kernel hand it to another worker",
                len(gone),
                migrate_req() or "absent",
            )

    def close(self) -> None:
        for sock in [*self._slots.values(), *filter(None, [self._shared])]:
            sock.close()
        self._slots.clear()
        self._shared = None

    def _bind(self, reuse_port: bool) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(self.address)
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(True)
        sock.setblocking(False)
        return sock
