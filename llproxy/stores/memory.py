"""Rate counting in memory shared by one host's processes: moving windows with no message
per request.

The master allocates one table before it starts its workers; every worker maps it
(passed at spawn) and checks and counts a hit in one step under one process-shared lock,
a few microseconds, instead of asking the master over its channel (which halved
throughput). A client's hits are counted in slices of 1/64 of its window, each with its
count and the time of its newest hit, so a slot is the same size whatever the limit. A
slice leaves the count once its newest hit is a whole window old: no window ever holds
more hits than the limit, and a hit leaves at most one slice late, never early.

A client that finds no free slot (more than SLOTS clients inside their windows at once)
is counted by an overflow counter instead: the master's, over the channel, so the count
stays exact whichever worker serves it.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..core.errors import ServiceUnavailable
from ..core.ratelimit import Verdict, parse_limit

SLOTS = 4096
SLICES = 64
PROBES = 32  # slots looked at for a client before it overflows
LOCK_WAIT = 1.0  # seconds; the lock is held for microseconds, so this is a failure
# A slot: the client's digest, its limit (amount, seconds), the number of its oldest
# counted slice and the hits counted; then, for a ring of SLICES + 1 slices, the time of
# each slice's newest hit and each slice's count.
_HEAD = struct.Struct("=16sIdqI4x")
RING = SLICES + 1
_TIMES_OFFSET = _HEAD.size
_COUNTS_OFFSET = _TIMES_OFFSET + RING * 8
SLOT_BYTES = _COUNTS_OFFSET + RING * 4 + 4  # 8-byte aligned
TABLE_BYTES = SLOTS * SLOT_BYTES  # 3.4 MB
_EMPTY = bytes(16)

Overflow = Callable[[str, str], Awaitable[Verdict]]


class ProcessLock(Protocol):
    def acquire(self, blocking: bool, timeout: float, /) -> bool: ...
    def release(self) -> None: ...


# A lab's clients are few and ask again and again: the digest of each, worked out once
# (the hash and the formatting were a third of a hit's time, measured).
@functools.lru_cache(maxsize=SLOTS)
def _place(amount: int, seconds: float, client: str, slots: int) -> tuple[bytes, int]:
    """A client's digest under a limit, and the first slot its probe looks at."""
    digest = hashlib.blake2b(f"{amount}/{seconds}:{client}".encode(), digest_size=16).digest()
    return digest, int.from_bytes(digest[:8], "little") % slots


class WindowTable:
    """Moving windows of clients in a fixed table of slots, found by a digest of the client
    and its limit (open addressing); a slot whose hits all left their window is reused."""

    def __init__(self, memory: Any, lock: ProcessLock, slots: int = SLOTS) -> None:
        self.view = memoryview(memory).cast("B")
        assert len(self.view) >= slots * SLOT_BYTES
        self.slots = slots
        self.lock = lock
        # A slot's times and counts as typed views, made at its first use: all of them at
        # start cost every worker 1.5 MB for the slots its clients never reach.
        self._views: dict[int, tuple[memoryview[float], memoryview[int]]] = {}

    def _part(self, slot: int, offset: int, size: int) -> memoryview:
        start = slot * SLOT_BYTES + offset
        return self.view[start : start + size]

    def _slot(self, slot: int) -> tuple[memoryview[float], memoryview[int]]:
        """The slot's times (float seconds) and counts, a value per slice of the ring."""
        views = self._views.get(slot)
        if views is None:
            views = self._views[slot] = (
                self._part(slot, _TIMES_OFFSET, RING * 8).cast("d"),
                self._part(slot, _COUNTS_OFFSET, RING * 4).cast("I"),
            )
        return views

    def hit(self, amount: int, seconds: float, client: str) -> Verdict | None:
        """Check and count one request; None when this client cannot be held here."""
        digest, start = _place(amount, seconds, client, self.slots)
        if not self.lock.acquire(True, LOCK_WAIT):
            raise ServiceUnavailable("the rate limiter is unavailable")
        try:
            now = time.monotonic()
            found = self._find(digest, start, now)
            if found is None:
                return None
            slot, head = found
            return self._count(slot, head, amount, seconds, now)
        finally:
            self.lock.release()

    def _find(self, digest: bytes, start: int, now: float) -> tuple[int, tuple[Any, ...]] | None:
        """The client's slot and its head (`_HEAD`, unpacked: counting reads it from here,
        not again), or a free one made its own; None when none is within PROBES."""
        head = _HEAD.unpack_from(self.view, start * SLOT_BYTES)
        if head[0] == digest:  # at its first probe, as most clients are (no loop set up)
            return start, head
        reusable = None
        for probe in range(PROBES):
            slot = (start + probe) % self.slots
            head = _HEAD.unpack_from(self.view, slot * SLOT_BYTES)
            found, _, seconds, _, total = head
            if found == digest:
                return slot, head
            if found == _EMPTY:  # the end of this digest's probe chain
                reusable = slot if reusable is None else reusable
                break
            # Every hit of that client left its window: the slot is free again.
            if reusable is None and (total == 0 or max(self._slot(slot)[0]) <= now - seconds):
                reusable = slot
        if reusable is None:
            return None
        self.view[reusable * SLOT_BYTES : (reusable + 1) * SLOT_BYTES] = bytes(SLOT_BYTES)
        head = (digest, 0, 0.0, 0, 0)
        _HEAD.pack_into(self.view, reusable * SLOT_BYTES, *head)
        return reusable, head

    def _count(
        self, slot: int, found: tuple[Any, ...], amount: int, seconds: float, now: float
    ) -> Verdict:
        """Count a hit in the slot whose head (`_HEAD`, unpacked) is `found`."""
        digest, _, _, head, total = found
        times, counts = self._slot(slot)
        current = int(now * SLICES / seconds)
        if current - head > RING:  # idle for longer than the window: nothing is left
            counts[:] = memoryview(bytes(RING * 4)).cast("I")
            head, total = current, 0
        # Slices whose newest hit is a whole window old give their hits back.
        while head < current:
            index = head % RING
            if counts[index] and times[index] > now - seconds:
                break
            total -= counts[index]
            counts[index] = 0
            head += 1
        allowed = total < amount
        if allowed:
            index = current % RING
            counts[index] += 1
            times[index] = now
            total += 1
        _HEAD.pack_into(self.view, slot * SLOT_BYTES, digest, amount, seconds, head, total)
        oldest = head % RING
        reset = times[oldest] + seconds - now if total and counts[oldest] else 0.0
        return Verdict(allowed, amount, amount - total, max(0.0, reset))


class DequeWindows:
    """Exact moving windows in this process's own memory: the overflow counter (the
    master's for a host's workers, or a single process's own)."""

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

    async def probe(self) -> bool:
        return True  # memory of this host

    async def close(self) -> None:
        pass
