"""Configuration: one loader turns a JSON file (or the built-in default) into frozen dataclasses.

Every problem is reported as a ConfigError whose message starts with the field path
(`endpoints[1].port_end: must be >= port_start (8010)`), so a bad file stops startup
before any socket is opened.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson

from .core.ratelimit import parse_limit

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

EX_CONFIG = 78
DEFAULT_RATE_LIMIT = "1000 per 15 minutes"
MAX_RANGE_PORTS = 4096

# Local ports of the common OpenAI-compatible servers: llama.cpp, vLLM, Ollama, LM Studio,
# text-generation-webui / tabbyAPI, koboldcpp, SGLang.
DEFAULT_LOCAL_PORTS = (8080, 8000, 11434, 1234, 5000, 5001, 30000)

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; the message names the field path."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. There is deliberately no total timeout: generation may run for many minutes."""

    connect: float = 10.0
    # A model may have to be loaded from disk before the first byte; minutes are normal.
    first_byte: float = 600.0
    idle: float = 300.0
    scan: float = 3.0
    # Client side: a request body must arrive within client_body; an idle connection (or
    # one still sending its headers) is closed after keepalive.
    client_body: float = 60.0
    keepalive: float = 30.0
    # A translated stream whose model is silent this long (a long prefill) gets its
    # dialect's keepalive (Anthropic's ping, a comment), so clients do not give up.
    stream_keepalive: float = 10.0


@dataclass(frozen=True, slots=True)
class Discovery:
    """How scans treat what they found before."""

    # A server that listed models keeps them through this many failed scans in a row (a
    # slow or erroring listing); one whose port refuses connections loses them at once.
    forget_after: int = 3
    # Whether models seen only through another llproxy are listed to other llproxies: off,
    # two llproxies that scan each other would keep a dead server's models alive.
    reexport: bool = False


@dataclass(frozen=True, slots=True)
class Health:
    """Replica health (core/health.py): when a replica is ejected and for how long."""

    enable: bool = True
    failures: int = 3  # failed requests in a row that eject a replica
    ejection: float = 5.0  # seconds of the first ejection; each one in a row doubles it
    max_ejection: float = 300.0  # the longest ejection
    # An ejected replica of a `url` endpoint gets a light probe (its model listing) when
    # its ejection ends, so it comes back without a client's request as its trial.
    probe: bool = True


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One configured source of models: a port range on a host, one known server URL, or
    a human operator who answers as a model."""

    index: int
    hostname: str | None = None
    port_start: int | None = None
    port_end: int | None = None
    url: str | None = None
    apikey: str | None = field(default=None, repr=False)
    filter: str | None = None
    models: tuple[str, ...] | None = None
    tags: tuple[str, ...] = ()
    enable: bool = True
    # A human operator: the model's base name, and how long a request may wait.
    operator: str | None = None
    queue_timeout: float = 300.0  # seconds unclaimed
    idle_timeout: float = 120.0  # seconds of silence from the operator who claimed it
    fallback: str | None = None  # the model that answers when a timeout runs out
    # One answer's text and tool calls: the master's desk holds each whole until it ends.
    max_answer_bytes: int = 4 * 1024 * 1024
    # The protocol the server at `url` speaks: "openai" (chat completions) or a cloud
    # API's own ("anthropic"), which a backend of its own translates to and from.
    dialect: str = "openai"
    # Known secrets replaced in the prompts sent here (core/redact.py): on by default for
    # the cloud dialects, whose servers are someone else's.
    redact: bool = False

    def base_urls(self) -> list[str]:
        """The base URLs this endpoint stands for: OpenAI's end in /v1, a cloud dialect's
        is the server's root; none for an operator, who is not scanned."""
        if self.operator is not None:
            return []
        if self.url is not None:
            return [self.url]
        assert self.hostname is not None and self.port_start is not None
        assert self.port_end is not None
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return [f"http://{host}:{port}/v1" for port in range(self.port_start, self.port_end + 1)]


@dataclass(frozen=True, slots=True)
class Capture:
    """Where and what the wire capture writes (telemetry/capture.py); absent: off."""

    dir: str
    max_bytes: int = 100 * 1024 * 1024  # one file's size before it rotates
    files: int = 10  # files kept per worker, the one being written included
    models: tuple[str, ...] = ()  # globs of the model asked for or served; empty: all
    keys: tuple[str, ...] = ()  # key names; empty: every client
    failed_only: bool = False  # only exchanges answered with a status >= 400


@dataclass(frozen=True, slots=True)
class Commands:
    """Commands in the chat (`!/help`, core/commands.py): a user message starting with the
    prefix is for llproxy, except for the keys named (globs) in `disabled_keys`."""

    enable: bool = True
    prefix: str = "!/"
    disabled_keys: tuple[str, ...] = ()


# The modes of core/toolloop.py.
TOOL_LOOP_MODES = ("off", "warn", "break")


@dataclass(frozen=True, slots=True)
class ToolLoops:
    """What llproxy does about a run of identical tool calls at a conversation's end."""

    mode: str = "warn"  # off | warn (a note for the model) | break (llproxy answers)
    repeats: int = 5  # the same call this many times in a row is a loop


@dataclass(frozen=True, slots=True)
class Config:
    bindip: str = "127.0.0.1"
    port: int = 42069
    interval_ms: int = 30000
    workers: int | None = None
    # One listening socket per worker (SO_REUSEPORT) so the kernel spreads connections;
    # False: one socket shared by all (older kernels, other platforms).
    reuse_port: bool = True
    default_model: str | None = None
    timeouts: Timeouts = Timeouts()
    discovery: Discovery = Discovery()
    health: Health = Health()
    max_request_bytes: int = 10 * 1024 * 1024
    # What one upstream response may send (an upstream is whatever listens on a scanned
    # port): a whole body, one event of a stream, and how far compression may expand.
    max_response_bytes: int = 64 * 1024 * 1024
    max_event_bytes: int = 4 * 1024 * 1024
    max_compression_ratio: int = 100
    endpoints: tuple[Endpoint, ...] = ()
    # Paths below /v1/ forwarded besides the built-in inference ones (e.g. "tokenize").
    forward_paths: tuple[str, ...] = ()
    # Other names for models: (exact name or glob, model name), in the file's order.
    # Each alias names a chain: the models tried in order (one, for a plain alias).
    aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Extra Host header names accepted when bound to loopback (e.g. behind a local nginx).
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    state_dir: str | None = None
    # Per client (API key name, else address); None disables. Keys may carry their own.
    rate_limit: str | None = DEFAULT_RATE_LIMIT
    trusted_proxies: tuple[str, ...] = ()
    redis_url: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)  # enables /admin/
    capture: Capture | None = None
    commands: Commands = Commands()
    tool_loops: ToolLoops = ToolLoops()
    source: str = "<built-in default>"
    # This running llproxy's name on the wire (Via, its model listing), so it never
    # discovers itself nor serves a request that went round through it. Set at start.
    instance: str = ""

    @property
    def loopback_only(self) -> bool:
        return self.bindip == "localhost" or ipaddress.ip_address(self.bindip).is_loopback

    def secrets(self) -> tuple[str, ...]:
        """Every secret this configuration holds, for the log to mask."""
        values = [*self.api_keys, self.admin_key, *(e.apikey for e in self.endpoints)]
        if self.redis_url is not None:
            values.append(urlsplit(self.redis_url).password)
        return tuple(value for value in values if value)

    def with_overrides(self, **changes: Any) -> Config:
        """A copy with the non-None values in changes applied (command-line flags)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def default_endpoints() -> tuple[Endpoint, ...]:
    return tuple(
        Endpoint(index=i, hostname="127.0.0.1", port_start=port, port_end=port)
        for i, port in enumerate(DEFAULT_LOCAL_PORTS)
    )


def single_server_endpoints(host: str, port: int) -> tuple[Endpoint, ...]:
    _check_port("--aihostport", port)
    return (Endpoint(index=0, hostname=host, port_start=port, port_end=port),)


# --- field readers: each takes the path for its error message -----------------------------


def _expect(path: str, value: Any, kind: type[T] | tuple[type, ...], what: str) -> T:
    # bool is an int subclass in Python; JSON true must never pass as a port number.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{path}: must be {what}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{path}: must be {what}, got {_json_type(value)}")
    return value  # type: ignore[return-value]


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"the number {value!r}"
    return names.get(type(value), type(value).__name__)


def _check_port(path: str, value: Any) -> int:
    port = _expect(path, value, int, "an integer port")
    if not 1 <= port <= 65535:
        raise ConfigError(f"{path}: must be between 1 and 65535, got {port}")
    return port


def _positive_number(path: str, value: Any) -> float:
    number: float = _expect(path, value, (int, float), "a number")
    if number <= 0:
        raise ConfigError(f"{path}: must be > 0, got {number}")
    return float(number)


def _positive_int(path: str, value: Any) -> int:
    number = _expect(path, value, int, "an integer")
    if number <= 0:
        raise ConfigError(f"{path}: must be > 0, got {number}")
    return number


def _nonempty_str(path: str, value: Any) -> str:
    text = _expect(path, value, str, "a string")
    if not text.strip():
        raise ConfigError(f"{path}: must not be empty")
    return text


def _string_list(path: str, value: Any) -> tuple[str, ...]:
    items = _expect(path, value, list, "a list of strings")
    return tuple(_nonempty_str(f"{path}[{i}]", item) for i, item in enumerate(items))


# The groups of secrets a config holds; a command asks only for the ones it uses, so an
# `env:` variable it never reads may be unset (`llproxy usage` needs no upstream apikey).
SECRET_GROUPS = frozenset({"endpoints", "api_keys", "admin_key", "redis_url"})


@dataclass(frozen=True, slots=True)
class _Secrets:
    environ: Mapping[str, str]
    needed: frozenset[str]

    def read(self, path: str, value: Any, group: str) -> str | None:
        """The secret, from the environment for `env:NAME`; None when that variable is
        unset and this command does not need the group."""
        text = _nonempty_str(path, value)
        if text.startswith("env:"):
            name = text[4:]
            if not self.environ.get(name):
                if group not in self.needed:
                    return None
                # Name the variable, never the secret.
                raise ConfigError(f"{path}: environment variable {name} is not set")
            text = self.environ[name]
        # Secrets go into header lines, where a line break would end the header early.
        if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
            raise ConfigError(f"{path}: contains a control character (a trailing newline?)")
        return text


def _bind_address(path: str, value: Any) -> str:
    text = _nonempty_str(path, value)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if text != "localhost":
            raise ConfigError(f"{path}: must be an IP address, got {text!r}") from None
    return text


def _check_keys(path: str, obj: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        where = f"{path}." if path else ""
        names = ", ".join(f"{where}{key}" for key in unknown)
        raise ConfigError(f"{names}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _optional(obj: Mapping[str, Any], key: str, read: Callable[[Any], T], default: T) -> T:
    return read(obj[key]) if key in obj and obj[key] is not None else default


# --- sections ---------------------------------------------------------------------------

_TIMEOUT_KEYS = {f.name for f in dataclasses.fields(Timeouts)}


def _timeouts(path: str, value: Any) -> Timeouts:
    obj = _expect(path, value, dict, "an object")
    _check_keys(path, obj, _TIMEOUT_KEYS)
    chosen = {
        key: _positive_number(f"{path}.{key}", obj[key])
        for key in _TIMEOUT_KEYS
        if obj.get(key) is not None
    }
    return Timeouts(**chosen)


def _discovery(path: str, value: Any) -> Discovery:
    obj = _expect(path, value, dict, "an object")
    _check_keys(path, obj, {"forget_after", "reexport"})
    defaults = Discovery()
    return Discovery(
        forget_after=_optional(
            obj,
            "forget_after",
            partial(_positive_int, f"{path}.forget_after"),
            defaults.forget_after,
        ),
        reexport=_optional(
            obj,
            "reexport",
            lambda v: _expect(f"{path}.reexport", v, bool, "a boolean"),
            defaults.reexport,
        ),
    )


def _health(path: str, value: Any) -> Health:
    obj = _expect(path, value, dict, "an object")
    _check_keys(path, obj, {f.name for f in dataclasses.fields(Health)})
    defaults = Health()

    def flag(key: str) -> bool:
        def read(v: Any) -> bool:
            return _expect(f"{path}.{key}", v, bool, "a boolean")

        default: bool = getattr(defaults, key)
        return _optional(obj, key, read, default)

    def seconds(key: str) -> float:
        default: float = getattr(defaults, key)
        return _optional(obj, key, partial(_positive_number, f"{path}.{key}"), default)

    health = Health(
        enable=flag("enable"),
        failures=_optional(
            obj, "failures", partial(_positive_int, f"{path}.failures"), defaults.failures
        ),
        ejection=seconds("ejection"),
        max_ejection=seconds("max_ejection"),
        probe=flag("probe"),
    )
    if health.max_ejection < health.ejection:
        raise ConfigError(
            f"{path}.max_ejection: must be >= ejection ({health.ejection:g}), "
            f"got {health.max_ejection:g}"
        )
    return health


_OPERATOR_KEYS = {
    "operator",
    "tags",
    "enable",
    "queue_timeout",
    "idle_timeout",
    "fallback",
    "max_answer_bytes",
}
_OPERATOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENDPOINT_KEYS = _OPERATOR_KEYS | {
    "hostname",
    "port_start",
    "port_end",
    "url",
    "apikey",
    "filter",
    "models",
    "tags",
    "enable",
    "dialect",
    "redact",
}
# Back-end dialects besides OpenAI's, each answered by a backend of its own.
DIALECTS = ("openai", "anthropic", "gemini")


def _operator(path: str, obj: dict[str, Any], common: dict[str, Any]) -> Endpoint:
    for key in sorted(set(obj) - _OPERATOR_KEYS):
        raise ConfigError(f"{path}.{key}: not for an operator endpoint")
    name = _nonempty_str(f"{path}.operator", obj["operator"])
    if not _OPERATOR_NAME.fullmatch(name):
        raise ConfigError(
            f"{path}.operator: 1 to 64 letters, digits, '.', '_' or '-', got {name[:80]!r}"
        )
    defaults = Endpoint(index=0)

    def seconds(key: str, default: float) -> float:
        return _optional(obj, key, lambda v: _positive_number(f"{path}.{key}", v), default)

    return Endpoint(
        operator=name,
        queue_timeout=seconds("queue_timeout", defaults.queue_timeout),
        idle_timeout=seconds("idle_timeout", defaults.idle_timeout),
        fallback=_optional(obj, "fallback", lambda v: _nonempty_str(f"{path}.fallback", v), None),
        max_answer_bytes=_optional(
            obj,
            "max_answer_bytes",
            lambda v: _positive_int(f"{path}.max_answer_bytes", v),
            defaults.max_answer_bytes,
        ),
        **common,
    )


def _dialect(path: str, value: Any) -> str:
    name = _nonempty_str(path, value)
    if name not in DIALECTS:
        raise ConfigError(f"{path}: must be one of {', '.join(DIALECTS)}, got {name[:80]!r}")
    return name


def _endpoint(index: int, value: Any, secrets: _Secrets) -> Endpoint:
    path = f"endpoints[{index}]"
    obj = _expect(path, value, dict, "an object")
    _check_keys(path, obj, _ENDPOINT_KEYS)
    enable = _optional(
        obj, "enable", lambda v: _expect(f"{path}.enable", v, bool, "a boolean"), True
    )
    tags: tuple[str, ...] = _optional(obj, "tags", lambda v: _string_list(f"{path}.tags", v), ())
    for i, tag in enumerate(tags):
        if any(ch.isspace() for ch in tag) or ":" in tag:
            raise ConfigError(f"{path}.tags[{i}]: must not contain spaces or ':', got {tag!r}")
    filter_ = _optional(obj, "filter", lambda v: _nonempty_str(f"{path}.filter", v), None)
    # A disabled endpoint may name a variable that is not set on this machine.
    apikey = (
        _optional(obj, "apikey", lambda v: secrets.read(f"{path}.apikey", v, "endpoints"), None)
        if enable
        else None
    )
    common: dict[str, Any] = dict(
        index=index, tags=tags, enable=enable, filter=filter_, apikey=apikey
    )
    if "operator" in obj:
        return _operator(path, obj, common)
    for key in sorted(set(obj) & (_OPERATOR_KEYS - {"tags", "enable"})):
        raise ConfigError(f"{path}.{key}: only for an operator endpoint (with operator)")

    if "url" in obj:
        clash = sorted({"hostname", "port_start", "port_end"} & set(obj))
        if clash:
            raise ConfigError(f"{path}.{clash[0]}: cannot be combined with url")
        url = _nonempty_str(f"{path}.url", obj["url"]).rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{path}.url: must be an http:// or https:// URL, got {url!r}")
        try:
            parts.port  # noqa: B018 - urlsplit validates the port lazily
        except ValueError:
            raise ConfigError(f"{path}.url: invalid port in {url!r}") from None
        models = _optional(obj, "models", lambda v: _string_list(f"{path}.models", v), None)
        dialect = _optional(obj, "dialect", lambda v: _dialect(f"{path}.dialect", v), "openai")
        if dialect != "openai":
            # The cloud APIs' own paths (/v1/messages) start at the server's root.
            url = url.removesuffix("/v1").removesuffix("/v1beta")
        redact = _redact(path, obj, dialect != "openai")
        return Endpoint(url=url, models=models, dialect=dialect, redact=redact, **common)

    if "dialect" in obj:
        raise ConfigError(f"{path}.dialect: only allowed together with url")
    if "models" in obj:
        raise ConfigError(f"{path}.models: only allowed together with url")
    if "hostname" not in obj:
        raise ConfigError(f"{path}: needs either url or hostname with port_start and port_end")
    hostname = _nonempty_str(f"{path}.hostname", obj["hostname"]).strip("[]")
    if "port_start" not in obj:
        raise ConfigError(f"{path}.port_start: required with hostname")
    port_start = _check_port(f"{path}.port_start", obj["port_start"])
    port_end = _check_port(f"{path}.port_end", obj.get("port_end", port_start))
    if port_end < port_start:
        raise ConfigError(f"{path}.port_end: must be >= port_start ({port_start}), got {port_end}")
    if port_end - port_start + 1 > MAX_RANGE_PORTS:
        raise ConfigError(
            f"{path}.port_end: range of {port_end - port_start + 1} ports is over the limit of "
            f"{MAX_RANGE_PORTS}; split it into several endpoints"
        )
    return Endpoint(
        hostname=hostname,
        port_start=port_start,
        port_end=port_end,
        redact=_redact(path, obj, False),
        **common,
    )


def _redact(path: str, obj: Mapping[str, Any], default: bool) -> bool:
    return _optional(
        obj, "redact", lambda v: _expect(f"{path}.redact", v, bool, "a boolean"), default
    )


_TOP_KEYS = {
    "port",
    "bindip",
    "interval",
    "workers",
    "reuse_port",
    "default_model",
    "timeouts",
    "discovery",
    "health",
    "max_request_bytes",
    "max_response_bytes",
    "max_event_bytes",
    "max_compression_ratio",
    "endpoints",
    "forward_paths",
    "aliases",
    "allowed_hosts",
    "cors_origins",
    "api_keys",
    "state_dir",
    "rate_limit",
    "trusted_proxies",
    "redis_url",
    "admin_key",
    "capture",
    "commands",
    "tool_loops",
}
MIN_STATIC_KEY_LENGTH = 16
# Positive whole numbers that bound what a client or an upstream may send.
_BOUNDS = ("max_request_bytes", "max_response_bytes", "max_event_bytes", "max_compression_ratio")


def parse_config(
    data: Any,
    source: str = "<string>",
    environ: Mapping[str, str] | None = None,
    needs: frozenset[str] = SECRET_GROUPS,
) -> Config:
    """Validate decoded JSON and build the Config; raises ConfigError naming the field.
    Secrets outside `needs` whose variable is unset are left out."""
    env = _Secrets(os.environ if environ is None else environ, needs)
    obj = _expect("(top level)", data, dict, "a JSON object")
    _check_keys("", obj, _TOP_KEYS)
    defaults = Config()
    endpoints_raw = _optional(
        obj, "endpoints", lambda v: _expect("endpoints", v, list, "a list"), None
    )
    endpoints = (
        default_endpoints()
        if endpoints_raw is None
        else tuple(_endpoint(i, item, env) for i, item in enumerate(endpoints_raw))
    )
    return Config(
        bindip=_optional(obj, "bindip", lambda v: _bind_address("bindip", v), defaults.bindip),
        port=_optional(obj, "port", lambda v: _check_port("port", v), defaults.port),
        interval_ms=_optional(
            obj, "interval", lambda v: _interval("interval", v), defaults.interval_ms
        ),
        workers=_optional(obj, "workers", lambda v: _positive_int("workers", v), None),
        reuse_port=_optional(
            obj, "reuse_port", lambda v: _expect("reuse_port", v, bool, "a boolean"), True
        ),
        default_model=_optional(
            obj, "default_model", lambda v: _nonempty_str("default_model", v), None
        ),
        timeouts=_optional(obj, "timeouts", lambda v: _timeouts("timeouts", v), defaults.timeouts),
        discovery=_optional(
            obj, "discovery", lambda v: _discovery("discovery", v), defaults.discovery
        ),
        health=_optional(obj, "health", lambda v: _health("health", v), defaults.health),
        **{
            key: _optional(obj, key, partial(_positive_int, key), getattr(defaults, key))
            for key in _BOUNDS
        },
        endpoints=endpoints,
        forward_paths=_optional(
            obj, "forward_paths", lambda v: _forward_paths("forward_paths", v), ()
        ),
        aliases=_optional(obj, "aliases", lambda v: _aliases("aliases", v), ()),
        allowed_hosts=_optional(
            obj, "allowed_hosts", lambda v: _string_list("allowed_hosts", v), ()
        ),
        cors_origins=_optional(obj, "cors_origins", lambda v: _cors_origins("cors_origins", v), ()),
        api_keys=_optional(obj, "api_keys", lambda v: _static_keys("api_keys", v, env), ()),
        state_dir=_optional(obj, "state_dir", lambda v: _nonempty_str("state_dir", v), None),
        # Explicit null switches limits off, so a missing key and null differ here.
        rate_limit=rate_limit_value("rate_limit", obj["rate_limit"])
        if "rate_limit" in obj
        else DEFAULT_RATE_LIMIT,
        trusted_proxies=_optional(
            obj, "trusted_proxies", lambda v: _networks("trusted_proxies", v), ()
        ),
        redis_url=_optional(obj, "redis_url", lambda v: _redis_url("redis_url", v, env), None),
        admin_key=_optional(
            obj, "admin_key", lambda v: _long_secret("admin_key", v, env, "admin_key"), None
        ),
        capture=_optional(obj, "capture", lambda v: _capture("capture", v), None),
        commands=_optional(obj, "commands", lambda v: _commands("commands", v), Commands()),
        tool_loops=_optional(
            obj, "tool_loops", lambda v: _tool_loops("tool_loops", v), ToolLoops()
        ),
        source=source,
    )


def _capture(path: str, value: Any) -> Capture | None:
    """The capture settings; None (off) with `"enable": false`, checked all the same."""
    obj = _expect(path, value, dict, "a JSON object")
    allowed = {"dir", "max_bytes", "files", "models", "keys", "failed_only", "enable"}
    _check_keys(path, obj, allowed)
    enable = _optional(
        obj, "enable", lambda v: _expect(f"{path}.enable", v, bool, "a boolean"), True
    )
    if "dir" not in obj:
        raise ConfigError(f"{path}.dir: required")
    defaults = Capture("")
    capture = Capture(
        dir=_nonempty_str(f"{path}.dir", obj["dir"]),
        max_bytes=_optional(
            obj, "max_bytes", partial(_positive_int, f"{path}.max_bytes"), defaults.max_bytes
        ),
        files=_optional(obj, "files", partial(_positive_int, f"{path}.files"), defaults.files),
        models=_optional(obj, "models", partial(_string_list, f"{path}.models"), ()),
        keys=_optional(obj, "keys", partial(_string_list, f"{path}.keys"), ()),
        failed_only=_optional(
            obj,
            "failed_only",
            lambda v: _expect(f"{path}.failed_only", v, bool, "a boolean"),
            False,
        ),
    )
    return capture if enable else None


def _commands(path: str, value: Any) -> Commands:
    obj = _expect(path, value, dict, "a JSON object")
    _check_keys(path, obj, {"enable", "prefix", "disabled_keys"})
    defaults = Commands()
    prefix = _optional(obj, "prefix", partial(_nonempty_str, f"{path}.prefix"), defaults.prefix)
    if prefix != prefix.strip() or len(prefix) > 16:
        raise ConfigError(f"{path}.prefix: 1 to 16 characters, no spaces around, got {prefix!r}")
    return Commands(
        enable=_optional(
            obj, "enable", lambda v: _expect(f"{path}.enable", v, bool, "a boolean"), True
        ),
        prefix=prefix,
        disabled_keys=_optional(
            obj, "disabled_keys", partial(_string_list, f"{path}.disabled_keys"), ()
        ),
    )


def _tool_loops(path: str, value: Any) -> ToolLoops:
    obj = _expect(path, value, dict, "a JSON object")
    _check_keys(path, obj, {"mode", "repeats"})
    defaults = ToolLoops()
    mode = _optional(obj, "mode", partial(_nonempty_str, f"{path}.mode"), defaults.mode)
    if mode not in TOOL_LOOP_MODES:
        raise ConfigError(f"{path}.mode: must be one of {', '.join(TOOL_LOOP_MODES)}, got {mode!r}")
    repeats = _optional(obj, "repeats", partial(_positive_int, f"{path}.repeats"), defaults.repeats)
    if repeats < 2:
        raise ConfigError(f"{path}.repeats: must be at least 2, got {repeats}")
    return ToolLoops(mode, repeats)


def rate_limit_value(path: str, value: Any) -> str | None:
    if value is None:
        return None
    text = _nonempty_str(path, value)
    try:
        parse_limit(text)
    except ValueError:
        raise ConfigError(
            f"{path}: must be like '60 per minute' or '1000 per 15 minutes', got {text!r}"
        ) from None
    return text


def parse_networks(values: Sequence[str]) -> tuple[IpNetwork, ...]:
    """Addresses or networks; a ValueError (`[index]: …`) names the first that is neither."""
    networks = []
    for i, value in enumerate(values):
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"[{i}]: must be an IP address or network, got {value!r}") from None
    return tuple(networks)


def _networks(path: str, value: Any) -> tuple[str, ...]:
    items = _string_list(path, value)
    try:
        parse_networks(items)
    except ValueError as exc:
        raise ConfigError(f"{path}{exc}") from None
    return items


def _redis_url(path: str, value: Any, secrets: _Secrets) -> str | None:
    url = secrets.read(path, value, "redis_url")  # may carry a password
    if url is None:
        return None
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{path}: must be a redis://, rediss:// or unix:// URL")
    return url


def _long_secret(path: str, value: Any, secrets: _Secrets, group: str) -> str | None:
    secret = secrets.read(path, value, group)
    if secret is not None and len(secret) < MIN_STATIC_KEY_LENGTH:
        raise ConfigError(f"{path}: must be at least {MIN_STATIC_KEY_LENGTH} characters")
    return secret


def _static_keys(path: str, value: Any, secrets: _Secrets) -> tuple[str, ...]:
    items = _expect(path, value, list, "a list of keys")
    keys = (_long_secret(f"{path}[{i}]", item, secrets, "api_keys") for i, item in enumerate(items))
    return tuple(key for key in keys if key is not None)


def _cors_origins(path: str, value: Any) -> tuple[str, ...]:
    origins = _string_list(path, value)
    for i, origin in enumerate(origins):
        parts = urlsplit(origin)
        if origin != "*" and (
            parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/")
        ):
            raise ConfigError(
                f"{path}[{i}]: must be an origin like https://app.example.com or *, got {origin!r}"
            )
    return tuple(o.rstrip("/") for o in origins)


def _aliases(path: str, value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    obj = _expect(path, value, dict, "an object of name (or glob) → model name or list of them")
    pairs = []
    for name, target in obj.items():
        where = f"{path}.{name}"
        if not name.strip() or not name.isprintable():
            raise ConfigError(f"{path}: a name must be printable and not empty, got {name!r}")
        if isinstance(target, list):
            if not target:
                raise ConfigError(f"{where}: a fallback chain must name at least one model")
            chain = tuple(_nonempty_str(f"{where}[{i}]", t) for i, t in enumerate(target))
        else:
            chain = (_nonempty_str(where, target),)
        pairs.append((name, chain))
    return tuple(pairs)


_FORWARD_PATH = re.compile(r"[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*")


def _forward_paths(path: str, value: Any) -> tuple[str, ...]:
    items = _string_list(path, value)
    for i, item in enumerate(items):
        if not _FORWARD_PATH.fullmatch(item.strip("/")):
            raise ConfigError(
                f"{path}[{i}]: must be a path below /v1/ such as 'tokenize' "
                f"(letters, digits, '-', '_' and '/'), got {item!r}"
            )
    return tuple(item.strip("/") for item in items)


def _interval(path: str, value: Any) -> int:
    interval = _positive_int(path, value)
    if interval < 1000:
        raise ConfigError(f"{path}: must be at least 1000 milliseconds, got {interval}")
    return interval


def load_config(
    path: Path, environ: Mapping[str, str] | None = None, needs: frozenset[str] = SECRET_GROUPS
) -> Config:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from None
    try:
        return parse_config(data, source=str(path), environ=environ, needs=needs)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def find_config_file(explicit: str | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The first config file in lookup order; None means the built-in default applies.

    An explicitly named file (flag or $LLPROXY_CONFIG) must exist; the well-known places
    are only used when present.
    """
    env = os.environ if environ is None else environ
    named = explicit or env.get("LLPROXY_CONFIG")
    if named:
        return Path(named)
    xdg = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    for candidate in (
        Path("llproxy.json"),
        Path(xdg) / "llproxy" / "llproxy.json",
        Path("/etc/llproxy/llproxy.json"),
    ):
        if candidate.is_file():
            return candidate
    return None


def resolve_config(
    explicit: str | None,
    environ: Mapping[str, str] | None = None,
    needs: frozenset[str] = SECRET_GROUPS,
) -> Config:
    path = find_config_file(explicit, environ)
    if path is None:
        return Config(endpoints=default_endpoints())
    return load_config(path, environ, needs)
