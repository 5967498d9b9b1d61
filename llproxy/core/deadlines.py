"""Request deadlines checked by one ticking timer per worker instead of one timer each.

`asyncio.timeout` arms an event-loop timer on entry and re-arms it on every reschedule;
under uvloop that cost about a fifth of a proxied request's CPU. Upstream timeouts are
seconds to minutes long, so checking every deadline ten times a second is exact enough:
a deadline fires at most RESOLUTION late. Semantics follow `asyncio.timeout`: the task is
cancelled and the cancellation leaves the block as TimeoutError. Entering and leaving a
block need no awaiting, so it is a plain `with` block.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

RESOLUTION = 0.1


class Deadline:
    """One block's deadline; `extend` moves it, e.g. after every chunk of a stream. It
    cancels the task it was made in, the one that runs its block (as a stream's reads
    all run in its request's task)."""

    __slots__ = ("_loop", "_task", "_watchdog", "expired", "when")

    def __init__(self, watchdog: Watchdog, when: float) -> None:
        self._watchdog = watchdog
        # Kept, not asked of the watchdog each time: a stream enters, leaves and moves its
        # deadline once a chunk (with the chunk writer's kept transport, the calls saved
        # were 4 % of a relayed chunk's instructions, measured together).
        self._loop = watchdog.loop
        # Found once, not on each entry: in Python 3.11 current_task is a Python function,
        # and a stream enters its deadline once a chunk.
        self._task: asyncio.Task[object] | None = asyncio.current_task(self._loop)
        self.when = when
        self.expired = False

    def extend(self, seconds: float) -> None:
        """Due `seconds` from now, and armed again if it had fired (a block that reuses
        it for every wait, as a stream does for each chunk, gets a fresh deadline each)."""
        self.when = self._loop.time() + seconds
        self.expired = False

    def expire(self) -> None:
        if not self.expired and self._task is not None:
            self.expired = True
            self._task.cancel()

    def __enter__(self) -> Deadline:
        self._watchdog.watch(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._watchdog.active.discard(self)
        if self.expired:
            assert self._task is not None
            # Only this deadline's cancellation becomes a timeout; another one (the
            # client left, the worker stops) is still pending and propagates.
            if self._task.uncancel() == 0 and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc


class Watchdog:
    """The deadlines of one event loop; ticks only while some block is being watched."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self.active: set[Deadline] = set()  # the deadlines of the blocks being run
        self._ticking: asyncio.TimerHandle | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, found at first use: a Watchdog can be made before it runs."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def deadline(self, seconds: float) -> Deadline:
        return Deadline(self, self.loop.time() + seconds)

    def watch(self, deadline: Deadline) -> None:
        self.active.add(deadline)
        if self._ticking is None:
            self._ticking = self.loop.call_later(RESOLUTION, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        for deadline in [d for d in self.active if d.when <= now]:
            deadline.expire()
        self._ticking = self.loop.call_later(RESOLUTION, self._tick) if self.active else None

    def close(self) -> None:
        if self._ticking is not None:
            self._ticking.cancel()
            self._ticking = None
