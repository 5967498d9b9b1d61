"""Command line: parse flags, build the Config, hand it to the code that runs it."""

from __future__ import annotations

import dataclasses
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .config import (
    EX_CONFIG,
    SECRET_GROUPS,
    Capture,
    Config,
    ConfigError,
    resolve_config,
    single_server_endpoints,
)

F = TypeVar("F", bound=Callable[..., Any])


def build_config(
    config_path: str | None, overrides: dict[str, Any], needs: frozenset[str] = SECRET_GROUPS
) -> Config:
    """The config file (or default) with command-line overrides; raises ConfigError.
    `needs` names the secrets the command uses (SECRET_GROUPS)."""
    changes = dict(overrides)
    aihost = changes.pop("aihost", None)
    aihostport = changes.pop("aihostport", None)
    if (aihost is None) != (aihostport is None):
        raise ConfigError("--aihost and --aihostport must be given together")
    capture_dir = changes.pop("capture_dir", None)
    config = resolve_config(config_path, needs=needs)
    if capture_dir is not None:
        # --capture DIR: the config's capture settings, written there (or the defaults).
        changes["capture"] = (
            Capture(capture_dir)
            if config.capture is None
            else dataclasses.replace(config.capture, dir=capture_dir)
        )
    if aihost is not None:
        changes["endpoints"] = single_server_endpoints(aihost, aihostport)
    return config.with_overrides(**changes)


def load_or_exit(
    config_path: str | None, needs: frozenset[str] = SECRET_GROUPS, **overrides: Any
) -> Config:
    try:
        return build_config(config_path, overrides, needs)
    except ConfigError as exc:
        click.echo(f"llproxy: configuration error: {exc}", err=True)
        sys.exit(EX_CONFIG)


def env_option(*names: str, env: str, **kwargs: Any) -> Callable[[F], F]:
    return click.option(*names, envvar=f"LLPROXY_{env}", show_envvar=True, **kwargs)


config_option = env_option(
    "--config",
    "config_path",
    env="CONFIG",
    metavar="PATH",
    help="JSON config file. Default: ./llproxy.json, $XDG_CONFIG_HOME/llproxy/llproxy.json, "
    "/etc/llproxy/llproxy.json, else a scan of the usual local ports.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llproxy")
def main() -> None:
    """One OpenAI-compatible endpoint for every LLM server llproxy can find."""


LOCAL_DATE = click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"])


def state_directory(config_path: str | None, state_dir: str | None) -> Path:
    """The state directory a `keys` or `usage` command works on, as the daemon finds it."""
    from .stores.sqlite import state_dir as resolve

    return resolve(load_or_exit(config_path, frozenset(), state_dir=state_dir).state_dir)


state_dir_option = env_option(
    "--state-dir",
    env="STATE_DIR",
    metavar="DIR",
    help="Where the key and usage database lives. Default: state_dir of the config, "
    "$STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/llproxy.",
)


def refuse_open_bind(config: Config, allow_open: bool) -> None:
    """Without keys, anyone who reaches the port may use every model: only on loopback."""
    from .stores.sqlite import StoredKeys, state_dir

    if config.loopback_only or allow_open:
        return
    stored = StoredKeys(state_dir(config.state_dir))
    enabled = bool(config.api_keys) or bool(stored.changed())
    stored.close()
    if not enabled:
        click.echo(
            f"llproxy: refusing to serve on {config.bindip} without API keys: anyone who can "
            "reach it could use every model. Create a key with `llproxy keys create --name "
            "NAME`, set api_keys in the config, or pass --allow-open.",
            err=True,
        )
        sys.exit(EX_CONFIG)


@main.command()
@config_option
@env_option(
    "--bindip", env="BINDIP", metavar="IP", help="Address to listen on [default: 127.0.0.1]."
)
@env_option(
    "--bindport",
    env="BINDPORT",
    metavar="PORT",
    type=click.IntRange(1, 65535),
    help="Port to listen on [default: 42069].",
)
@env_option(
    "--aihost",
    env="AIHOST",
    metavar="HOST",
    help="Proxy this one server instead of the configured endpoints (needs --aihostport).",
)
@env_option(
    "--aihostport",
    env="AIHOSTPORT",
    metavar="PORT",
    type=click.IntRange(1, 65535),
    help="Port of --aihost.",
)
@env_option(
    "--workers",
    env="WORKERS",
    metavar="N",
    type=click.IntRange(1, 256),
    help="Worker processes [default: `workers` in the config, else one per CPU core].",
)
@env_option(
    "--scan-interval",
    env="SCAN_INTERVAL",
    metavar="SECONDS",
    type=click.FloatRange(1.0),
    help="Rediscovery period [default: 30].",
)
@env_option(
    "--graceful-timeout",
    env="GRACEFUL_TIMEOUT",
    metavar="SECONDS",
    default=30.0,
    type=click.FloatRange(0.0),
    show_default=True,
    help="On stop or reload, how long requests and streams in flight may finish.",
)
@env_option(
    "--log-format",
    env="LOG_FORMAT",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: coloured on a terminal, plain otherwise; json: one object per line.",
)
@state_dir_option
@env_option(
    "--allow-open",
    env="ALLOW_OPEN",
    is_flag=True,
    help="Serve a non-loopback address even though no API key exists.",
)
@env_option(
    "--capture",
    "capture_dir",
    env="CAPTURE",
    metavar="DIR",
    help="Write every exchange (secrets masked) to DIR/capture-<worker>.jsonl; "
    "see `capture` in the config. Read with `llproxy capture show`.",
)
@env_option(
    "-v",
    "--verbose",
    env="VERBOSE",
    count=True,
    help="-v: a line per request; -vv: also bodies (truncated, secrets redacted) and debug detail.",
)
def serve(
    config_path: str | None,
    bindip: str | None,
    bindport: int | None,
    aihost: str | None,
    aihostport: int | None,
    workers: int | None,
    scan_interval: float | None,
    graceful_timeout: float,
    log_format: str,
    state_dir: str | None,
    allow_open: bool,
    capture_dir: str | None,
    verbose: int,
) -> None:
    """Discover models and serve them on one OpenAI-compatible endpoint.

    Signals: TERM/INT stop gracefully (a second INT forces), HUP reloads the config,
    TTIN/TTOU add/remove a worker. On a terminal, type 'help' for console commands.
    """
    overrides: dict[str, Any] = dict(
        bindip=bindip,
        port=bindport,
        aihost=aihost,
        aihostport=aihostport,
        interval_ms=None if scan_interval is None else int(scan_interval * 1000),
        state_dir=state_dir,
        capture_dir=capture_dir,
    )
    # A name for this running llproxy, so it never serves itself (see core.call.via_name).
    overrides["instance"] = secrets.token_hex(6)
    config = load_or_exit(config_path, **overrides)
    refuse_open_bind(config, allow_open)
    from .process.supervisor import ServeOptions, run
    from .ui.logs import setup_logging

    setup_logging(verbose, log_format, secrets=config.secrets())
    options = ServeOptions(
        load_config=lambda: build_config(config_path, overrides),
        workers=workers,
        verbose=verbose,
        log_format=log_format,
        graceful_timeout=graceful_timeout,
        console=sys.stdin.isatty(),
    )
    sys.exit(run(config, options))


@main.command("scan")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def scan_command(config_path: str | None, as_json: bool) -> None:
    """Run one discovery pass and list the models found, each replica with its state
    (up when it listed its models; a server whose models the config names is probed)."""
    config = load_or_exit(config_path, frozenset({"endpoints"}))
    from .ui.logs import setup_logging
    from .ui.scan import run_scan

    setup_logging(0, stream=sys.stderr, secrets=config.secrets())
    sys.exit(run_scan(config, as_json))


DEFAULT_URL = "http://127.0.0.1:42069"


@main.command("operator")
@env_option(
    "--url",
    env="URL",
    metavar="URL",
    default=DEFAULT_URL,
    show_default=True,
    help="The llproxy whose requests you answer.",
)
@env_option(
    "--token",
    env="OPERATOR_TOKEN",
    metavar="KEY",
    help="Your operator key (llproxy keys create --operator). Without it you are asked for "
    "it on a terminal; prefer that or the variable: a command line is visible to others.",
)
def operator_command(url: str, token: str | None) -> None:
    """Answer requests as an operator model, from this terminal.

    Shows the queue; type a request's number to claim it. Its conversation appears, then
    every line you type goes to the client at once (lines joined by newlines). Commands
    while answering: /finish, /tool NAME {json}, /reject [message], /handoff MODEL
    [replace|continue], /release, /queue, /help, /quit. Exits 0 on /quit or end of input,
    1 when the key is refused or the server stays out of reach, 2 on a usage error.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise click.BadParameter("an http:// or https:// address is needed", param_hint="--url")
    if not token:
        if not sys.stdin.isatty():
            raise click.UsageError(
                "no operator key: pass --token or set LLPROXY_OPERATOR_TOKEN "
                "(stdin is no terminal to ask for it on)"
            )
        token = click.prompt("operator key", hide_input=True)
    from .ui.operator import run_operator

    sys.exit(run_operator(url, token.strip()))


@main.group()
def keys() -> None:
    """API keys: clients' (once any exists, every model request needs one) and operators'."""


@keys.command("create")
@config_option
@state_dir_option
@click.option("--name", required=True, help="A unique name for the key (shown in logs).")
@click.option(
    "--models",
    metavar="GLOB,...",
    default="",
    help="Comma-separated model globs this key may use [default: all].",
)
@click.option(
    "--rate-limit",
    metavar="LIMIT",
    help="This key's own limit, e.g. '60 per minute' [default: rate_limit of the config].",
)
@click.option(
    "--expires",
    metavar="DATE",
    type=LOCAL_DATE,
    help="Local date (and time) after which the key stops working.",
)
@click.option(
    "--operator",
    is_flag=True,
    help="A key for a person who answers as an operator model (the operator page, "
    "`llproxy operator`); it calls no model. --models then limits the operator models "
    "whose requests they see.",
)
def keys_create(
    config_path: str | None,
    state_dir: str | None,
    name: str,
    models: str,
    rate_limit: str | None,
    expires: Any,
    operator: bool,
) -> None:
    """Create a key and print its secret alone on stdout (it is shown only this once)."""
    from .config import rate_limit_value
    from .core.keys import KeyFieldError
    from .stores import create_key
    from .stores.sqlite import DATABASE
    from .stores.sqlite import state_dir as resolve_state_dir

    if rate_limit is not None:
        try:
            rate_limit_value("--rate-limit", rate_limit)
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None
    globs = [glob.strip() for glob in models.split(",") if glob.strip()]
    config = load_or_exit(config_path, frozenset(), state_dir=state_dir)
    try:
        secret = create_key(
            config, name, globs, expires.timestamp() if expires else None, rate_limit, operator
        )
    except KeyFieldError as exc:
        message = str(exc).partition(": ")[2]
        raise click.BadParameter(message, param_hint=f"--{exc.field}") from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    where = resolve_state_dir(config.state_dir) / DATABASE
    click.echo(f"created key {name!r} in {where}; its secret follows on stdout", err=True)
    click.echo(secret)


@keys.command("list")
@config_option
@state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def keys_list(config_path: str | None, state_dir: str | None, as_json: bool) -> None:
    """List the keys (names, fingerprints, models, status; never secrets)."""
    from .stores.sqlite import KeyStore
    from .ui.tables import show_keys

    with KeyStore(state_directory(config_path, state_dir)) as store:
        show_keys(store.all(), as_json)


@keys.command("revoke")
@config_option
@state_dir_option
@click.argument("name")
def keys_revoke(config_path: str | None, state_dir: str | None, name: str) -> None:
    """Revoke a key; a running daemon refuses it within a few seconds (with redis_url in the
    config, every instance sharing that Redis does)."""
    import asyncio

    from redis.exceptions import RedisError

    from .stores import revoke_key

    config = load_or_exit(config_path, frozenset({"redis_url"}), state_dir=state_dir)
    try:
        revoked = asyncio.run(revoke_key(config, name))
    except (RedisError, OSError) as exc:
        raise click.ClickException(f"revoked here, but not shared through Redis: {exc}") from None
    if not revoked:
        raise click.ClickException(f"no active key named {name!r}")
    click.echo(f"revoked key {name!r}", err=True)


@main.command("usage")
@config_option
@state_dir_option
@click.option(
    "--since",
    metavar="DATE",
    type=LOCAL_DATE,
    help="Only requests from this local date (and time) on.",
)
@click.option(
    "--by",
    type=click.Choice(["key", "model", "day", "dialect"]),
    default="key",
    show_default=True,
    help="Group by API key (or client address), model, local day, or the client's dialect.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def usage_command(
    config_path: str | None, state_dir: str | None, since: Any, by: str, as_json: bool
) -> None:
    """Sum the recorded requests and tokens."""
    from .stores.sqlite import usage_sums
    from .ui.tables import show_usage

    since_time = since.timestamp() if since else None
    rows = usage_sums(state_directory(config_path, state_dir), since_time, by)
    show_usage(rows, by, as_json)


capture_dir_option = click.option(
    "--dir",
    "directory",
    metavar="DIR",
    help="The capture directory [default: capture.dir of the config].",
)


@main.group()
def capture() -> None:
    """Read the wire capture (`capture` in the config, or `serve --capture DIR`)."""


@capture.command("show")
@config_option
@capture_dir_option
@click.option(
    "--last",
    metavar="N",
    type=click.IntRange(1),
    default=10,
    show_default=True,
    help="Show the last N exchanges (after the filters).",
)
@click.option("--model", "model_glob", metavar="GLOB", help="Only exchanges of these models.")
@click.option("--failed", is_flag=True, help="Only exchanges answered with a status >= 400.")
@click.option("--json", "as_json", is_flag=True, help="Print the captured lines as a JSON array.")
def capture_show(
    config_path: str | None,
    directory: str | None,
    last: int,
    model_glob: str | None,
    failed: bool,
    as_json: bool,
) -> None:
    """Print captured exchanges: request and answer side by side, streams folded to text."""
    from .telemetry.capture import select_exchanges
    from .ui.capture import show_exchanges

    found = select_exchanges(capture_directory(config_path, directory), last, model_glob, failed)
    show_exchanges(found, as_json)


@capture.command("replay")
@config_option
@capture_dir_option
@env_option(
    "--url",
    env="URL",
    metavar="URL",
    default="http://127.0.0.1:42069",
    show_default=True,
    help="The llproxy to send it to.",
)
@env_option(
    "--key",
    env="KEY",
    metavar="KEY",
    help="The API key to send it with (the capture holds none).",
)
@click.argument("exchange_id", metavar="ID")
def capture_replay(
    config_path: str | None, directory: str | None, url: str, key: str | None, exchange_id: str
) -> None:
    """Send a captured request (by its id, see `capture show`) to llproxy again and show
    the new answer beside the captured one."""
    import asyncio

    from .telemetry.capture import read_exchanges
    from .ui.capture import replay, show_replay

    found = [
        e
        for e in read_exchanges(capture_directory(config_path, directory))
        if e.get("id") == exchange_id
    ]
    if not found:
        raise click.ClickException(f"no captured exchange {exchange_id}")
    try:
        status, answer = asyncio.run(replay(found[-1], url, key))
    except ValueError as exc:
        raise click.ClickException(f"cannot replay {exchange_id}: {exc}") from None
    except (TimeoutError, OSError) as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None
    show_replay(found[-1], status, answer)


def capture_directory(config_path: str | None, directory: str | None) -> Path:
    """--dir, else the config's capture.dir."""
    if directory is None:
        config = load_or_exit(config_path, frozenset())
        if config.capture is None:
            raise click.ClickException("no capture in the config: give --dir DIR")
        directory = config.capture.dir
    if not Path(directory).is_dir():
        raise click.ClickException(f"no capture directory {directory}")
    return Path(directory)
