"""Memory that a burst of connections freed goes back to the system.

glibc's malloc keeps the heap pages freed by thousands of closed connections (parser
buffers, transports, large dicts) for reuse until it is told to trim: after 5,000 idle
connections closed, a worker held 25 MB more than `malloc_trim(0)` left it. The worker
watches its open connections and trims once they fell well below their peak. What
Python's own allocator keeps (arenas pinned by a few live objects) is not affected.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger("llproxy.memory")

# Open connections fewer than their peak since the last trim that make a trim worth it.
BURST = 1000
CHECK_EVERY = 1.0


def malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class BurstWatch:
    """Says when to trim: once the connections fell by `burst` from their peak since
    the last time it said so."""

    def __init__(self, burst: int = BURST) -> None:
        self.burst = burst
        self.peak = 0

    def fell(self, connections: int) -> bool:
        self.peak = max(self.peak, connections)
        if self.peak - connections < self.burst:
            return False
        self.peak = connections
        return True


async def trim_after_bursts(connections: Callable[[], int]) -> None:
    """Runs until cancelled; does nothing without malloc_trim."""
    trim = malloc_trim()
    if trim is None:
        return
    watch = BurstWatch()
    while True:
        await asyncio.sleep(CHECK_EVERY)
        if watch.fell(connections()):
            trim()
            log.debug("gave freed heap memory back after a burst of connections")
