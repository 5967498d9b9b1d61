"""The systemd notify protocol: one datagram of `KEY=VALUE` lines to $NOTIFY_SOCKET.

Without $NOTIFY_SOCKET (not under systemd) every call does nothing. A leading '@' names
a socket in the abstract namespace. Sends never block: the receiver's queue is small (10
datagrams on Linux) and one that does not read would otherwise stop the master's loop.
When the queue is full a watchdog ping is dropped (the next one follows) and a state
message waits for the next send; both are counted.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Mapping

log = logging.getLogger("llproxy.sdnotify")

WATCHDOG = "WATCHDOG=1"
PENDING_LIMIT = 8  # state messages kept while the receiver's queue is full


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self._socket: socket.socket | None = None
        if self.address:
            self._socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        self._pending: deque[bytes] = deque()
        self.dropped = 0  # messages that never went out because the queue was full
        self.watchdog_interval = self._watchdog_interval(env)

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        """Half of WatchdogSec, as systemd advises; None when the watchdog is off for us."""
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2_000_000

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *lines: str) -> None:
        if self._socket is None:
            return
        message = "\n".join(lines).encode()
        # What waited goes first, so the receiver sees the messages in order.
        while self._pending and self._send(self._pending[0]):
            self._pending.popleft()
        if not self._pending and self._send(message):
            return
        if lines == (WATCHDOG,):
            self._drop()
            return
        self._pending.append(message)
        if len(self._pending) > PENDING_LIMIT:
            self._pending.popleft()
            self._drop()

    def _send(self, message: bytes) -> bool:
        """False when the receiver's queue is full; any other failure is logged (and the
        message is not retried)."""
        assert self._socket is not None
        try:
            self._socket.sendto(message, self.address)
        except BlockingIOError:
            return False
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address.replace("\0", "@"), exc)
        return True

    def _drop(self) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 100 == 0:
            log.warning(
                "sd_notify: %s is not reading; %d messages dropped so far",
                self.address.replace("\0", "@"),
                self.dropped,
            )

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
