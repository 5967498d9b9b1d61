"""Rate counting in memory shared by one host's processes: exact moving windows, with no
message per request.

The master allocates one table before it starts workers; every worker maps it (passed at
spawn) and checks and counts a hit in one step under one process-shared lock, a few
microseconds, instead of asking the master over its channel, which halved throughput.
A client's window is a ring of the times of its last `amount` allowed hits.

A client whose limit is larger than a ring, or that finds no free slot (the table is full
of clients still inside their windows), is counted by an overflow counter: the master's,
over the channel, so the count stays exact whichever worker serves it.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..core.errors import ServiceUnavailable
from ..core.ratelimit import Verdict, parse_limit

# 1024 clients inside their windows at once, each with up to 1024 hit times: 8 MiB.
SLOTS = 1024
RING = 1024  # hit times a slot holds: larger limits go to the overflow counter
PROBES = 32  # slots looked at for a client before it overflows
LOCK_WAIT = 1.0  # seconds; the lock is held for microseconds, so this is a failure
# A slot: the client's digest, its limit (amount, seconds), the ring's head and count,
# then the ring of hit times (monotonic seconds).
_HEAD = struct.Struct("=16sIdII")
_RING_OFFSET = 40
SLOT_BYTES = _RING_OFFSET + RING * 8
TABLE_BYTES = SLOTS * SLOT_BYTES
_EMPTY = bytes(16)

Overflow = Callable[[str, str], Awaitable[Verdict]]


class ProcessLock(Protocol):
    def acquire(self, blocking: bool, timeout: float, /) -> bool: ...
    def release(self) -> None: ...


class WindowTable:
    """Moving windows of clients in a fixed table of slots, found by a digest of the client
    and its limit (open addressing); a slot whose hits all left their window is reused."""

    def __init__(self, memory: Any, lock: ProcessLock, slots: int = SLOTS) -> None:
        self.view = memoryview(memory).cast("B")
        assert len(self.view) >= slots * SLOT_BYTES
        self.slots = slots
        self.lock = lock
        self.rings = [
            self.view[i * SLOT_BYTES + _RING_OFFSET : (i + 1) * SLOT_BYTES].cast("d")
            for i in range(slots)
        ]

    def hit(self, amount: int, seconds: float, client: str) -> Verdict | None:
        """Check and count one request; None when this client cannot be held here."""
        if amount > RING:
            return None
        digest = hashlib.blake2b(f"{amount}/{seconds}:{client}".encode(), digest_size=16).digest()
        start = int.from_bytes(digest[:8], "little") % self.slots
        if not self.lock.acquire(True, LOCK_WAIT):
            raise ServiceUnavailable("the rate limiter is unavailable")
        try:
            now = time.monotonic()
            slot = self._find(digest, start, now)
            if slot is None:
                return None
            return self._count(slot, amount, seconds, now)
        finally:
            self.lock.release()

    def _find(self, digest: bytes, start: int, now: float) -> int | None:
        reusable = None
        for probe in range(PROBES):
            slot = (start + probe) % self.slots
            found, amount, window, head, count = _HEAD.unpack_from(self.view, slot * SLOT_BYTES)
            if found == digest:
                return slot
            if found == _EMPTY:  # the end of this digest's probe chain
                reusable = slot if reusable is None else reusable
                break
            newest = self.rings[slot][(head + count - 1) % amount] if count else 0.0
            if reusable is None and newest <= now - window:
                reusable = slot
        if reusable is not None:
            _HEAD.pack_into(self.view, reusable * SLOT_BYTES, digest, 0, 0.0, 0, 0)
        return reusable

    def _count(self, slot: int, amount: int, seconds: float, now: float) -> Verdict:
        offset = slot * SLOT_BYTES
        digest, _, _, head, count = _HEAD.unpack_from(self.view, offset)
        ring = self.rings[slot]
        # Hits older than the window leave it: they are the oldest, so a binary search
        # over the ring, oldest first, finds how many.
        low, high = 0, count
        while low < high:
            middle = (low + high) // 2
            if ring[(head + middle) % amount] <= now - seconds:
                low = middle + 1
            else:
                high = middle
        head, count = (head + low) % amount, count - low
        allowed = count < amount
        if allowed:
            ring[(head + count) % amount] = now
            count += 1
        _HEAD.pack_into(self.view, offset, digest, amount, seconds, head, count)
        return Verdict(allowed, amount, amount - count, max(0.0, ring[head] + seconds - now))


class DequeWindows:
    """Moving windows in this process's own memory, of any size: the overflow counter
    (the master's for a host's workers, or a single process's own)."""

    def __init__(self) -> None:
        self.windows: dict[str, tuple[float, deque[float]]] = {}

    async def hit(self, limit: str, client: str) -> Verdict:
        parsed = parse_limit(limit)
        now = time.monotonic()
        key = f"{parsed.amount}/{parsed.seconds}:{client}"
        _, hits = self.windows.setdefault(key, (parsed.seconds, deque(maxlen=parsed.amount)))
        while hits and hits[0] <= now - parsed.seconds:
            hits.popleft()
        allowed = len(hits) < parsed.amount
        if allowed:
            hits.append(now)
        if len(self.windows) > 4 * SLOTS:
            self._forget_idle(now)
        reset = hits[0] + parsed.seconds - now if hits else 0.0
        return Verdict(allowed, parsed.amount, parsed.amount - len(hits), max(0.0, reset))

    def _forget_idle(self, now: float) -> None:
        for key, (seconds, hits) in list(self.windows.items()):
            if not hits or hits[-1] <= now - seconds:
                del self.windows[key]


class HostCounter:
    """The rate counter of one host: its table, and the overflow for what does not fit."""

    def __init__(self, table: WindowTable, overflow: Overflow) -> None:
        self.table = table
        self.overflow = overflow

    async def hit(self, limit: str, client: str) -> Verdict:
        parsed = parse_limit(limit)
        verdict = self.table.hit(parsed.amount, parsed.seconds, client)
        if verdict is None:
            return await self.overflow(limit, client)
        return verdict

    async def close(self) -> None:
        pass
