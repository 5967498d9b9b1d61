"""Which mending stages an answer goes through: the built-in default for the kind of
server (on for OpenAI-speaking ones, the discovered local servers; off for cloud APIs and
operators), then the config's `repair` (top level, the endpoint's, a model's), then what
the conversation set for itself (`!/set(tool-repair=false)`), each over the one before."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..registry import Replica
from .loops import LoopLimits

# The conversation's own settings (Call.settings) of each switch.
SETTINGS = {"tool-repair": "tool_calls", "thinking": "thinking", "loop-detection": "loops"}
_TRUE, _FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")
# Cached switches per (upstream, backend, model): bounded, cleared whole when full.
_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class Repair:
    """Switches of the stages; None: as the level below says."""

    tool_calls: bool | None = None
    thinking: bool | None = None
    loops: bool | None = None
    # The chat template opens the thinking block in the prompt: the answer starts inside
    # it and holds only the closing tag.
    think_open: bool | None = None

    def over(self, base: Repair) -> Repair:
        """These switches where set, `base`'s elsewhere."""
        chosen = {f.name: getattr(self, f.name) for f in fields(self)}
        return Repair(**{k: getattr(base, k) if v is None else v for k, v in chosen.items()})


LOCAL = Repair(tool_calls=True, thinking=True, loops=True, think_open=False)
OFF = Repair(tool_calls=False, thinking=False, loops=False, think_open=False)


@dataclass(frozen=True, slots=True)
class EndpointRepair:
    """An endpoint's own switches, and the servers it stands for: its URL, or a host and
    a range of ports."""

    repair: Repair
    url: str | None = None
    hostname: str | None = None
    port_start: int = 0
    port_end: int = 0

    def covers(self, base_url: str, hostname: str, port: int) -> bool:
        if self.url is not None:
            return base_url.rstrip("/") == self.url.rstrip("/")
        return hostname == self.hostname and self.port_start <= port <= self.port_end


@dataclass(frozen=True, slots=True)
class Mending:
    """The config's part: the top level's switches (for OpenAI-speaking servers), each
    endpoint's, each model glob's (in the file's order), and when a stream loops."""

    default: Repair = Repair()
    endpoints: tuple[EndpointRepair, ...] = ()
    models: tuple[tuple[str, Repair], ...] = ()
    loops: LoopLimits = field(default_factory=LoopLimits)


class MendPolicy:
    def __init__(self, mending: Mending) -> None:
        self.mending = mending
        self._cache: dict[tuple[str, str, str, str, bool], Repair] = {}

    def switches(
        self, replica: Replica | None, model: str, settings: Mapping[str, str], asked: str = ""
    ) -> Repair:
        """The stages on for an answer of `model` (the registry's; `asked`: the name the
        client gave, an alias) from `replica` in this conversation."""
        if replica is None:
            return OFF
        key = (replica.upstream.base_url, replica.backend, model, asked, replica.think_open)
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            found = self._cache[key] = self._configured(replica, model, asked)
        return conversation(settings).over(found) if settings else found

    def _configured(self, replica: Replica, model: str, asked: str) -> Repair:
        upstream = replica.upstream
        if replica.backend == "operator":
            return OFF  # a person answers: nothing to mend
        mending = self.mending
        # What its template shows (think_open) is below every configured level.
        local = Repair(think_open=True).over(LOCAL) if replica.think_open else LOCAL
        switches = OFF if upstream.dialect != "openai" else mending.default.over(local)
        for endpoint in mending.endpoints:
            if endpoint.covers(upstream.base_url, upstream.hostname, upstream.port):
                switches = endpoint.repair.over(switches)
                break
        for glob, repair in mending.models:
            if fnmatch.fnmatchcase(model, glob) or fnmatch.fnmatchcase(asked, glob):
                switches = repair.over(switches)
                break
        return switches


def conversation(settings: Mapping[str, str]) -> Repair:
    """The switches a conversation set with `!/set(name=value)`; others are ignored."""
    chosen: dict[str, Any] = {}
    for name, field_name in SETTINGS.items():
        value = settings.get(name, "").strip().lower()
        if value in _TRUE:
            chosen[field_name] = True
        elif value in _FALSE:
            chosen[field_name] = False
    return Repair(**chosen)
