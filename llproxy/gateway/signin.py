"""Failed operator sign-ins, limited per address: a wrong key guessed over and over is
refused once an address has failed SIGN_IN_FAILURES times in the window, whatever key it
then shows. Failures are counted by the rate counter (the host's table, or Redis across
hosts), so every worker sees them; a worker that saw an address refused keeps refusing
it until the window lets it try again, without asking."""

from __future__ import annotations

import time

from ..core.ratelimit import RateLimitExceeded, Verdict, parse_limit
from ..stores import RateCounter

SIGN_IN_FAILURES = "10 per minute"  # as HILT limits logins
_PREFIX = "operator-sign-in "  # the counter's client: never a key name or an address alone
_REMEMBERED = 10_000  # addresses refused at once, before the expired ones are dropped


class SignInGuard:
    def __init__(self, counter: RateCounter, limit: str = SIGN_IN_FAILURES) -> None:
        self.counter = counter
        self.limit = limit
        self._refused: dict[str, float] = {}  # address → monotonic end of its refusal

    def check(self, address: str) -> None:
        """RateLimitExceeded while the address is refused here."""
        until = self._refused.get(address)
        if until is None:
            return
        left = until - time.monotonic()
        if left <= 0:
            del self._refused[address]
            return
        raise self._exceeded(left)

    async def failed(self, address: str) -> None:
        """Count a failure; RateLimitExceeded when it was one too many."""
        verdict = await self.counter.hit(self.limit, _PREFIX + address)
        if verdict.allowed:
            return
        if len(self._refused) >= _REMEMBERED:
            now = time.monotonic()
            self._refused = {a: t for a, t in self._refused.items() if t > now}
        self._refused[address] = time.monotonic() + verdict.reset_after
        raise self._exceeded(verdict.reset_after)

    def _exceeded(self, seconds: float) -> RateLimitExceeded:
        verdict = Verdict(False, parse_limit(self.limit).amount, 0, seconds)
        return RateLimitExceeded(verdict, f"{self.limit} failed operator sign-ins per address")
