"""Replica health, per serving process: passive outlier ejection. A replica that fails
`failures` requests in a row (refused, reset, a 5xx, no first byte in time) is ejected
for a back-off that doubles with each ejection in a row, up to a cap; when it is over,
one request at a time (or a probe) is its trial: success reinstates it, failure ejects it
again for longer. The router asks before each attempt and reports what it came to.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Protocol

from .errors import ServiceUnavailable
from .registry import Model, Replica

log = logging.getLogger("llproxy.health")


@dataclass(slots=True)
class Pass:
    """Leave to send one attempt to a replica; its verdict is reported with it."""

    replica: Replica
    model: str  # the model it was sent for (what the metrics name)
    trial: bool = False  # the one attempt an ejected replica gets when its ejection ends
    watched: bool = True  # False for a backend health does not judge (a person)


@dataclass(slots=True)
class _State:
    failures: int = 0  # failed attempts in a row while in service
    ejections: int = 0  # ejections in a row: the back-off's exponent; a request's success resets it
    ejected: bool = False
    until: float = 0.0  # when an ejection ends (the clock's time)
    trying: bool = False  # its trial is under way


class HealthObserver(Protocol):
    """Told of each ejection and reinstatement (metrics, the probes)."""

    def ejected(self, replica: Replica, model: str, seconds: float) -> None: ...

    def reinstated(self, replica: Replica, model: str) -> None: ...


class Health:
    """The state of each replica this process sent to; replicas it never failed on have
    none. `exempt` names the backends whose replicas are never judged (an operator's)."""

    def __init__(
        self,
        failures: int = 3,
        ejection: float = 5.0,
        max_ejection: float = 300.0,
        *,
        enable: bool = True,
        exempt: Collection[str] = (),
        clock: Callable[[], float] = time.monotonic,
        observer: HealthObserver | None = None,
    ) -> None:
        self.failures = failures
        self.ejection = ejection
        self.max_ejection = max_ejection
        self.enable = enable
        self.exempt = frozenset(exempt)
        self.clock = clock
        self.observer = observer
        self._states: dict[Replica, _State] = {}

    def backoff(self, ejections: int) -> float:
        """Seconds of the n-th ejection in a row: the first lasts `ejection`, each next
        one twice the one before, none longer than `max_ejection`."""
        return min(self.ejection * 2.0 ** min(ejections - 1, 62), self.max_ejection)

    def admit(self, replica: Replica, model: str) -> Pass | None:
        """Leave to send to a replica now; None while it is ejected, or while another
        request is its trial."""
        if not self.enable or replica.backend in self.exempt:
            return Pass(replica, model, watched=False)
        if not self._states:  # every replica is well: no hashing of one on the hot path
            return Pass(replica, model)
        state = self._states.get(replica)
        if state is None or not state.ejected:
            return Pass(replica, model)
        if state.trying or self.clock() < state.until:
            return None
        state.trying = True
        return Pass(replica, model, trial=True)

    def succeeded(self, granted: Pass, probe: bool = False) -> None:
        """The replica answered (anything but a 5xx: a 4xx is the request's own fault).
        A probe's success reinstates it, but the back-off keeps growing until a request
        succeeds, and its first failure ejects it again: a server that lists its models
        may still fail every request."""
        if not granted.watched or not self._states:
            return
        state = self._states.get(granted.replica)
        if state is None or (probe and not state.ejected):  # a request reinstated it first
            return
        was_ejected = state.ejected
        if probe:
            state.failures = self.failures - 1
            state.ejected = state.trying = False
        else:
            del self._states[granted.replica]
        if was_ejected:
            log.info(
                "replica %s of %s reinstated%s",
                granted.replica.address,
                granted.model,
                " (its probe answered)" if probe else "",
                extra={
                    "event": "replica_reinstated",
                    "upstream": granted.replica.address,
                    "model": granted.model,
                },
            )
            if self.observer is not None:
                self.observer.reinstated(granted.replica, granted.model)

    def failed(self, granted: Pass, why: str = "") -> None:
        """The replica failed: refused, reset, a 5xx, or no first byte in time."""
        if not granted.watched:
            return
        state = self._states.setdefault(granted.replica, _State())
        if state.ejected:
            if granted.trial:  # else it was sent before the ejection: no news
                self._eject(granted, state, why)
            return
        state.failures += 1
        if state.failures >= self.failures:
            self._eject(granted, state, why)

    def abandoned(self, granted: Pass) -> None:
        """The attempt came to no verdict (the client left, the request itself was
        refused before it was sent): a trial's turn goes to the next request."""
        if granted.trial and (state := self._states.get(granted.replica)) is not None:
            state.trying = False

    def _eject(self, granted: Pass, state: _State, why: str) -> None:
        state.ejections += 1
        seconds = self.backoff(state.ejections)
        state.failures = 0
        state.ejected, state.trying = True, False
        state.until = self.clock() + seconds
        log.warning(
            "replica %s of %s ejected for %g s (%s)",
            granted.replica.address,
            granted.model,
            seconds,
            why or "failed",
            extra={
                "event": "replica_ejected",
                "upstream": granted.replica.address,
                "model": granted.model,
                "seconds": seconds,
            },
        )
        if self.observer is not None:
            self.observer.ejected(granted.replica, granted.model, seconds)

    def trial_in(self, replica: Replica) -> float | None:
        """Seconds until an ejected replica's trial may start (0: now, or one is under
        way); None when it is in service."""
        state = self._states.get(replica)
        if state is None or not state.ejected:
            return None
        return max(0.0, state.until - self.clock())

    def due(self, replicas: Iterable[tuple[Replica, str]]) -> tuple[list[Pass], float | None]:
        """The trials that may start now among these (replica, model) pairs, taken for a
        probe (requests keep avoiding them meanwhile), and the seconds until the next
        ejection among them ends (None: none is ejected)."""
        passes, wait = [], None
        for replica, model in replicas:
            left = self.trial_in(replica)
            if left is None:
                continue
            if left > 0:
                wait = left if wait is None else min(wait, left)
            elif (granted := self.admit(replica, model)) is not None:
                passes.append(granted)
        return passes, wait

    def states(self, models: Iterable[Model]) -> dict[tuple[str, str], float | None]:
        """Each judged replica of these models by (model, upstream address): the seconds
        until its trial (0: due or under way) while ejected, else None."""
        states: dict[tuple[str, str], float | None] = {}
        for model in models:
            for replica in model.replicas:
                if replica.backend in self.exempt:
                    continue
                key = (model.name, replica.address)
                left, before = self.trial_in(replica), states.get(key)
                # Two replicas at one address (other ids of one model): ejected if any is.
                if left is not None and before is not None:
                    left = min(left, before)
                states[key] = before if left is None else left
        return states

    def keep_only(self, replicas: Collection[Replica]) -> None:
        """Forget the replicas a new registry no longer has: discovery dropped them
        (gone, or forgotten after `forget_after` failed scans); found again, they start
        in service, since their server answered discovery."""
        for replica in self._states.keys() - set(replicas):
            del self._states[replica]


class Ejected(ServiceUnavailable):
    """Every replica of a model is ejected: answered at once instead of waiting on dead
    servers, with when the soonest trial may be (Retry-After)."""

    code = "replicas_ejected"

    def __init__(self, model: Model, wait: float) -> None:
        self.wait = max(1, math.ceil(wait))
        super().__init__(
            f"every replica of '{model.name}' failed recently and is ejected; "
            f"try again in {self.wait} s"
        )

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.wait)}
