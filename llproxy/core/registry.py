"""The model registry: an immutable snapshot of every model name and the replicas serving it.

A scan builds a new Registry and swaps it in whole; request handlers read whichever
snapshot is current without locks. In-flight counts used for balancing are per-process
state and live in `Balancer`, outside the snapshot.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

_MODEL_FILE_SUFFIX = re.compile(
    r"\.(gguf|ggml|bin|safetensors|pt|pth|onnx|llamafile)$", re.IGNORECASE
)


def model_name(upstream_id: str) -> str:
    """The id's last path segment with a model-file extension removed; nothing else."""
    segment = re.split(r"[/\\]", upstream_id.rstrip("/\\"))[-1] or upstream_id
    return _MODEL_FILE_SUFFIX.sub("", segment) or segment


def final_names(upstream_id: str, tags: Iterable[str]) -> list[str]:
    name = model_name(upstream_id)
    tagged = [f"{name}:{tag}" for tag in tags]
    return tagged or [name]


@dataclass(frozen=True, slots=True)
class Upstream:
    """One OpenAI-compatible server. The apikey is an upstream secret and never leaves here."""

    base_url: str
    hostname: str
    port: int
    tags: tuple[str, ...] = ()
    apikey: str | None = field(default=None, repr=False, compare=False)

    @property
    def address(self) -> str:
        return f"{self.hostname}:{self.port}"

    def auth_headers(self) -> dict[str, str]:
        """What every request to this upstream carries to authenticate, if anything."""
        return {"Authorization": f"Bearer {self.apikey}"} if self.apikey else {}


@dataclass(frozen=True, slots=True)
class Replica:
    upstream: Upstream
    upstream_id: str


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    replicas: tuple[Replica, ...]
    # The upstream's own /v1/models entry (first replica), passed through with `id` replaced.
    entry: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class FoundModel:
    """One model as discovery saw it, before names are merged into replicas."""

    name: str
    upstream: Upstream
    upstream_id: str
    entry: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Registry:
    # A plain dict, so a snapshot pickles to workers; nothing mutates it after build().
    models: Mapping[str, Model] = field(default_factory=dict)
    servers: int = 0

    @classmethod
    def build(cls, found: Iterable[FoundModel], servers: int) -> Registry:
        grouped: dict[str, list[FoundModel]] = {}
        for item in found:
            grouped.setdefault(item.name, []).append(item)
        models = {}
        for name in sorted(grouped):
            items = grouped[name]
            replicas = tuple(dict.fromkeys(Replica(i.upstream, i.upstream_id) for i in items))
            models[name] = Model(name, replicas, {**items[0].entry, "id": name})
        return cls(models, servers)

    def get(self, name: str) -> Model | None:
        return self.models.get(name)

    def listing(self) -> list[Mapping[str, Any]]:
        return [model.entry for model in self.models.values()]

    def upstreams(self) -> set[Upstream]:
        return {r.upstream for m in self.models.values() for r in m.replicas}


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
