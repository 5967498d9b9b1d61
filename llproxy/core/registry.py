"""The model registry: an immutable snapshot of every model name and the replicas serving it.

A scan builds a new Registry and swaps it in whole; request handlers read whichever
snapshot is current without locks. In-flight counts used for balancing are per-process
state and live in the router, outside the snapshot.
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


# What a server of each dialect is sent with every request: the header its key goes in
# (never the URL), and the fixed headers its API asks for.
_KEY_HEADERS = {"anthropic": "x-api-key", "gemini": "x-goog-api-key"}
_FIXED_HEADERS = {"anthropic": {"anthropic-version": "2023-06-01"}}


@dataclass(frozen=True, slots=True)
class Upstream:
    """One model server: OpenAI-compatible, or a cloud API in its own dialect. The apikey
    is an upstream secret and never leaves here."""

    base_url: str
    hostname: str
    port: int
    tags: tuple[str, ...] = ()
    apikey: str | None = field(default=None, repr=False, compare=False)
    dialect: str = "openai"
    # Known secrets are replaced in what is sent here (core/redact.py).
    redact: bool = False

    @property
    def address(self) -> str:
        return f"{self.hostname}:{self.port}"

    def auth_headers(self) -> dict[str, str]:
        """What every request to this upstream carries: the key in its dialect's header,
        and that dialect's fixed headers."""
        headers = dict(_FIXED_HEADERS.get(self.dialect, {}))
        if self.apikey:
            name = _KEY_HEADERS.get(self.dialect)
            if name is None:
                headers["Authorization"] = f"Bearer {self.apikey}"
            else:
                headers[name] = self.apikey
        return headers


@dataclass(frozen=True, slots=True)
class Replica:
    """One place a model is served: which backend answers it, where, under which id."""

    upstream: Upstream
    upstream_id: str
    backend: str = "openai_http"  # the kind of Backend that answers it
    # The instance name of the llproxy answering there, when the replica is one: a request
    # that already passed through it must not be sent back to it.
    instance: str = ""
    # Its chat template opens the thinking block in the prompt (llama.cpp's /props): the
    # answer starts inside it (core/mend's think_open unless configured otherwise).
    think_open: bool = False

    @property
    def address(self) -> str:
        return self.upstream.address


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    replicas: tuple[Replica, ...]
    # The upstream's own /v1/models entry (first replica), passed through with `id` replaced.
    entry: Mapping[str, Any]
    context_length: int | None = None  # tokens, where the upstream says (the least of all)
    capabilities: tuple[str, ...] = ()  # beyond completion: "tools", "vision", where known


@dataclass(frozen=True, slots=True)
class FoundModel:
    """One model as discovery saw it, before names are merged into replicas."""

    name: str
    upstream: Upstream
    upstream_id: str
    entry: Mapping[str, Any]
    context_length: int | None = None
    capabilities: tuple[str, ...] = ()
    backend: str = "openai_http"
    instance: str = ""  # the llproxy it was seen through, if the server is one
    aliases: tuple[str, ...] = ()  # other final names its server answers it by (llama.cpp)
    think_open: bool = False  # as Replica.think_open


@dataclass(frozen=True, slots=True)
class Registry:
    # A plain dict, so a snapshot pickles to workers; nothing mutates it after build().
    models: Mapping[str, Model] = field(default_factory=dict)
    servers: int = 0
    # Other names a server lists for its models (llama.cpp's `aliases`) → the model name.
    aliases: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, found: Iterable[FoundModel], servers: int) -> Registry:
        grouped: dict[str, list[FoundModel]] = {}
        for item in found:
            grouped.setdefault(item.name, []).append(item)
        models = {}
        aliases: dict[str, str] = {}
        for name in sorted(grouped):
            items = grouped[name]
            named = [a for i in items for a in i.aliases if a != name and a not in grouped]
            aliases.update((alias, name) for alias in named if alias not in aliases)
            entry = {**items[0].entry, "id": name}
            if "aliases" in entry:  # the names that answer here, not the server's own
                entry["aliases"] = [a for a in items[0].aliases if aliases.get(a) == name]
            replicas = tuple(
                dict.fromkeys(
                    Replica(i.upstream, i.upstream_id, i.backend, i.instance, i.think_open)
                    for i in items
                )
            )
            lengths = [i.context_length for i in items if i.context_length]
            models[name] = Model(
                name,
                replicas,
                entry,
                min(lengths) if lengths else None,
                items[0].capabilities,
            )
        return cls(models, servers, aliases)

    def get(self, name: str) -> Model | None:
        """The model of a name, or of another name its server gave it."""
        model = self.models.get(name)
        if model is None and name in self.aliases:
            model = self.models.get(self.aliases[name])
        return model

    def listing(self) -> list[Mapping[str, Any]]:
        return [model.entry for model in self.models.values()]

    def upstreams(self) -> set[Upstream]:
        return {r.upstream for m in self.models.values() for r in m.replicas}
