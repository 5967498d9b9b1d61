"""Command line: parse flags, build the Config, hand it to the code that runs it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import __version__
from .config import EX_CONFIG, Config, ConfigError, resolve_config, single_server_endpoints

F = TypeVar("F", bound=Callable[..., Any])


def build_config(config_path: str | None, overrides: dict[str, Any]) -> Config:
    """The config file (or default) with command-line overrides; raises ConfigError."""
    changes = dict(overrides)
    aihost = changes.pop("aihost", None)
    aihostport = changes.pop("aihostport", None)
    if (aihost is None) != (aihostport is None):
        raise ConfigError("--aihost and --aihostport must be given together")
    config = resolve_config(config_path)
    if aihost is not None:
        changes["endpoints"] = single_server_endpoints(aihost, aihostport)
    return config.with_overrides(**changes)


def load_or_exit(config_path: str | None, **overrides: Any) -> Config:
    try:
        return build_config(config_path, overrides)
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
    )
    config = load_or_exit(config_path, **overrides)
    from .logs import setup_logging
    from .supervisor import ServeOptions, run

    setup_logging(verbose, log_format)
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
    """Run one discovery pass and list the models found."""
    config = load_or_exit(config_path)
    from .logs import setup_logging
    from .report import run_scan

    setup_logging(0, stream=sys.stderr)
    sys.exit(run_scan(config, as_json))
