"""From a model name to an answer: the name resolved for the client's key, a replica
chosen (least requests in flight, none that is ejected: health.py), and the Call sent to
the backend that serves it, falling over to the next replica when one could not be
reached (and along an alias's chain of models, fallback.py). A replica that is an
llproxy the request already passed through is no route for it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from .call import Backend, Call, Reply, via_hops, via_name
from .errors import (
    LoopDetected,
    ModelNotAllowed,
    ModelNotFound,
    ReplicaUnavailable,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .fallback import Fallback
from .health import Ejected, Health, Pass
from .keys import ApiKey
from .record import RequestRecord
from .registry import Model, Registry, Replica


class Balancer:
    """Least-outstanding-requests choice among replicas, with per-process in-flight counts."""

    def __init__(self) -> None:
        self._in_flight: dict[str, int] = {}
        self._turn = 0

    def order(self, replicas: tuple[Replica, ...]) -> list[Replica]:
        """Replicas to try, least loaded first; ties rotate so idle replicas share the work."""
        if len(replicas) == 1:
            return list(replicas)
        self._turn += 1
        count = len(replicas)
        rotated = [replicas[(self._turn + i) % count] for i in range(count)]
        return sorted(rotated, key=lambda r: self._in_flight.get(r.upstream.base_url, 0))

    def acquire(self, replica: Replica) -> None:
        key = replica.upstream.base_url
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def release(self, replica: Replica) -> None:
        key = replica.upstream.base_url
        remaining = self._in_flight.get(key, 0) - 1
        if remaining > 0:
            self._in_flight[key] = remaining
        else:
            self._in_flight.pop(key, None)

    def in_flight(self, replica: Replica) -> int:
        return self._in_flight.get(replica.upstream.base_url, 0)


def check_model_allowed(key: ApiKey | None, model: Model) -> Model:
    if key is not None and not key.allows(model.name):
        raise ModelNotAllowed(f"this API key may not use the model '{model.name}'", param="model")
    return model


class Aliases:
    """Other names for models: exact names first, then globs in the config's order. Each
    names a chain: the models tried in order (one, for a plain alias)."""

    def __init__(self, pairs: Sequence[tuple[str, tuple[str, ...]]]) -> None:
        self.exact = {name: chain for name, chain in pairs if not _is_glob(name)}
        self.globs = [(name, chain) for name, chain in pairs if _is_glob(name)]

    def target(self, name: str) -> tuple[str, ...] | None:
        if name in self.exact:
            return self.exact[name]
        for glob, chain in self.globs:
            if fnmatch.fnmatchcase(name, glob):
                return chain
        return None


def _is_glob(name: str) -> bool:
    return any(char in name for char in "*?[")


def _behind(replica: Replica, hops: frozenset[str]) -> bool:
    """Whether a replica is an llproxy among the hops a request passed through."""
    return bool(replica.instance) and via_name(replica.instance) in hops


def _from_llproxy(hops: frozenset[str]) -> bool:
    return any(hop.startswith(via_name("")) for hop in hops)


class Router:
    def __init__(
        self,
        registry: Callable[[], Registry],
        backends: Mapping[str, Backend],
        aliases: Sequence[tuple[str, tuple[str, ...]]] = (),
        reexport: bool = False,
        health: Health | None = None,
    ) -> None:
        self._registry = registry  # the current snapshot, whoever swaps it
        self.backends = backends
        self.aliases = Aliases(aliases)
        self.balancer = Balancer()
        self.health = health or Health(enable=False)
        self.fallback = Fallback()
        self.reexport = reexport

    def resolve(self, name: str, key: ApiKey | None) -> Model:
        """The registry model a name stands for (itself, a configured alias, a name its
        server gave it, or `x:latest` for `x`), if this key may use it: a key's globs
        apply to the model an alias resolves to (the first of its chain here now)."""
        return self.chain(name, key)[0]

    def chain(self, name: str, key: ApiKey | None) -> tuple[Model, ...]:
        """The models a name is answered by, in the order they are tried: one, or an
        alias's chain without the entries that name no model here now and (after the
        first) those this key may not use, so a chain never widens what a key reaches."""
        registry = self._registry()
        model = registry.models.get(name)
        if model is not None:
            return (check_model_allowed(key, model),)
        targets = self.aliases.target(name)
        if targets is not None:
            found = [m for t in dict.fromkeys(targets) if (m := registry.get(t)) is not None]
            if found:
                check_model_allowed(key, found[0])
                usable = {m.name: m for m in found if key is None or key.allows(m.name)}
                return tuple(usable.values())
        model = registry.get(name)
        if model is None and name.endswith(":latest"):
            model = registry.get(name.removesuffix(":latest"))
        if model is None:
            raise ModelNotFound(name)
        return (check_model_allowed(key, model),)

    def listing(self, key: ApiKey | None, via: str = "") -> list[Mapping[str, Any]]:
        """The entries of the models this key may use, and of the exact aliases of them.
        An llproxy asking (its name in `via`) is not told of models served only through
        llproxies (unless reexport; never of those served only through itself): two that
        scan each other would otherwise keep a dead server's models alive for good."""
        models = self._registry().models
        if _from_llproxy(hops := via_hops(via)):
            models = {n: m for n, m in models.items() if self._tells(m, hops)}
        entries = [m.entry for name, m in models.items() if key is None or key.allows(name)]
        for alias, chain in self.aliases.exact.items():
            model = next((models[t] for t in chain if t in models), None)
            if (
                model is not None
                and alias not in models
                and (key is None or key.allows(model.name))
            ):
                entries.append({**model.entry, "id": alias})
        return entries

    def _tells(self, model: Model, hops: frozenset[str]) -> bool:
        """Whether a model is listed to an llproxy whose request passed through `hops`."""
        onward = [r for r in model.replicas if not _behind(r, hops)]
        return any(not r.instance for r in onward) or (self.reexport and bool(onward))

    async def send(
        self,
        call: Call,
        models: Model | Sequence[Model],
        record: RequestRecord,
        switched: Callable[[str], None] | None = None,
    ) -> Reply:
        """The answer of a model, or of the first of a chain (Router.chain) that answers:
        the next is tried when one fails before its first byte (fallback.py says how),
        each once. `switched` hears the name of each model tried after the first."""
        chain = (models,) if isinstance(models, Model) else tuple(models)

        def attempt(model: Model) -> Awaitable[Reply]:
            named = call if call.model == model.name else replace(call, model=model.name)
            return self._send_model(named, model, record)

        if len(chain) == 1:
            return await attempt(chain[0])
        return await self.fallback.send(chain, attempt, switched)

    async def _send_model(self, call: Call, model: Model, record: RequestRecord) -> Reply:
        """The first answer a replica gives; replicas that could not be reached (and were
        sent nothing) are skipped for the next. The replica counts as busy until the
        reply is closed."""
        refused: list[str] = []
        replicas = model.replicas
        if call.via and any(r.instance for r in replicas):
            hops = via_hops(call.via)
            replicas = tuple(r for r in replicas if not _behind(r, hops))
            if not replicas:
                raise LoopDetected(
                    f"every replica of '{model.name}' is an llproxy this request passed through"
                )
        ejected: list[Replica] = []
        for replica in self.balancer.order(replicas):
            granted = self.health.admit(replica, model.name)
            if granted is None:
                ejected.append(replica)
                continue
            record.upstream = replica.address
            self.balancer.acquire(replica)
            try:
                reply = await self.backends[replica.backend].send(call, replica, record)
            except ReplicaUnavailable as exc:
                self.balancer.release(replica)
                self.health.failed(granted, "refused")
                record.upstream_error = "refused"
                refused.append(exc.message)
                continue
            except BaseException as exc:
                self.balancer.release(replica)
                _judge_failure(self.health, granted, exc)
                raise
            if reply.status >= 500:
                self.health.failed(granted, f"HTTP {reply.status}")
            else:
                self.health.succeeded(granted)
            reply.model_id = replica.upstream_id
            reply.on_close(partial(self.balancer.release, replica))
            return reply
        if ejected and not refused:
            raise Ejected(model, min(self.health.trial_in(r) or 0.0 for r in ejected))
        raise UpstreamUnreachable(
            f"no upstream for model '{model.name}' could be reached: {'; '.join(refused)}"
        )


def _judge_failure(health: Health, granted: Pass, exc: BaseException) -> None:
    """What an attempt that raised says of its replica: reset or silent before its first
    byte is a failure; an answer too large is this request's, and a client that left or
    a request refused before it was sent says nothing of the replica."""
    if isinstance(exc, UpstreamTimeout):
        health.failed(granted, "no first byte in time")
    elif isinstance(exc, UpstreamUnreachable) and exc.code == UpstreamUnreachable.code:
        health.failed(granted, "reset")
    else:
        health.abandoned(granted)
