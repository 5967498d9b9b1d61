"""Fallback along an alias's chain of models: the next model is tried when one fails
before the client received a byte (no replica reachable or every one ejected, a 5xx, a
408 or 429, no first byte in time); a 429's Retry-After keeps that model out of chains
for that long (in this process). Any other answer, and the last model's failure, reach
the client as they are.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Awaitable, Callable, Sequence

from .call import Reply
from .errors import LoopDetected, ServiceUnavailable, UpstreamTimeout, UpstreamUnreachable
from .health import Ejected
from .registry import Model

# Failures raised before a first byte, after which another model may answer instead.
FALLS_OVER = (UpstreamUnreachable, UpstreamTimeout, LoopDetected, Ejected)
# A model's longest stay out of chains, whatever its Retry-After says.
MAX_SKIP = 3600.0


def falls_over(status: int) -> bool:
    """Whether an upstream's answer of this status lets the next model try: the server
    failed or is busy; any other 4xx says the request itself is wrong."""
    return status >= 500 or status in (408, 429)


def retry_after(headers: dict[str, str], now: float | None = None) -> float | None:
    """Seconds a 429 asks to wait (`retry-after-ms`, or `Retry-After` in seconds or as
    an HTTP date), capped at MAX_SKIP; None when it says nothing usable."""
    lowered = {name.lower(): value for name, value in headers.items()}
    seconds: float | None = None
    try:
        if "retry-after-ms" in lowered:
            seconds = float(lowered["retry-after-ms"]) / 1000
        elif "retry-after" in lowered:
            value = lowered["retry-after"].strip()
            try:
                seconds = float(value)
            except ValueError:
                when = email.utils.parsedate_to_datetime(value)
                seconds = when.timestamp() - (time.time() if now is None else now)
    except (ValueError, TypeError):
        return None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return None
    return min(seconds, MAX_SKIP)


class Fallback:
    """Tries a chain's models in order; remembers which a 429 asked to wait."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._until: dict[str, float] = {}  # model name → when its Retry-After ends

    def waiting(self, name: str) -> float:
        """Seconds left before a model told to wait is tried again in a chain; 0 if not."""
        until = self._until.get(name)
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            del self._until[name]
            return 0.0
        return left

    async def send(
        self,
        chain: Sequence[Model],
        attempt: Callable[[Model], Awaitable[Reply]],
        switched: Callable[[str], None] | None,
    ) -> Reply:
        """The first answer in the chain that does not fall over, else the last failure.
        Attempts run one after another in the caller's task, so a client that leaves
        cancels the one under way and no other starts."""
        ready = [m for m in chain if not self.waiting(m.name)]
        if not ready:
            wait = math.ceil(min(self.waiting(m.name) for m in chain))
            raise Busy(
                f"every model for '{chain[0].name}' asked to wait; try again in {wait} s", wait
            )
        for index, model in enumerate(ready):
            last = index == len(ready) - 1
            if model is not chain[0] and switched is not None:
                switched(model.name)
            try:
                reply = await attempt(model)
            except FALLS_OVER:
                if last:
                    raise
                continue
            if reply.status == 429 and (seconds := retry_after(reply.headers)) is not None:
                self._until[model.name] = self.clock() + seconds
            if last or not falls_over(reply.status):
                return reply
            reply.close()
        raise AssertionError("unreachable: the last model's answer is returned")


class Busy(ServiceUnavailable):
    """Every model of a chain is waiting out a 429's Retry-After."""

    def __init__(self, message: str, wait: int) -> None:
        super().__init__(message)
        self.wait = wait

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.wait)}
