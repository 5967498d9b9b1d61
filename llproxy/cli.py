"""Command line: parse flags, build the Config, hand it to the code that runs it."""

from __future__ import annotations

import sys
from typing import Any

import click

from . import __version__
from .config import EX_CONFIG, Config, ConfigError, resolve_config, single_server_endpoints


def _load(config_path: str | None, **overrides: Any) -> Config:
    aihost = overrides.pop("aihost", None)
    aihostport = overrides.pop("aihostport", None)
    try:
        if (aihost is None) != (aihostport is None):
            raise ConfigError("--aihost and --aihostport must be given together")
        config = resolve_config(config_path)
        if aihost is not None:
            overrides["endpoints"] = single_server_endpoints(aihost, aihostport)
        return config.with_overrides(**overrides)
    except ConfigError as exc:
        click.echo(f"llproxy: configuration error: {exc}", err=True)
        sys.exit(EX_CONFIG)


config_option = click.option(
    "--config",
    "config_path",
    metavar="PATH",
    envvar="LLPROXY_CONFIG",
    show_envvar=True,
    help="JSON config file. Default: ./llproxy.json, $XDG_CONFIG_HOME/llproxy/llproxy.json, "
    "/etc/llproxy/llproxy.json, else a scan of the usual local ports.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llproxy")
def main() -> None:
    """One OpenAI-compatible endpoint for every LLM server llproxy can find."""


@main.command()
@config_option
@click.option(
    "--bindip",
    envvar="LLPROXY_BINDIP",
    show_envvar=True,
    help="Address to listen on [default: 127.0.0.1].",
)
@click.option(
    "--bindport",
    type=click.IntRange(1, 65535),
    envvar="LLPROXY_BINDPORT",
    show_envvar=True,
    help="Port to listen on [default: 42069].",
)
@click.option(
    "--aihost",
    metavar="HOST",
    envvar="LLPROXY_AIHOST",
    show_envvar=True,
    help="Proxy this one server instead of the configured endpoints (needs --aihostport).",
)
@click.option(
    "--aihostport",
    metavar="PORT",
    type=click.IntRange(1, 65535),
    envvar="LLPROXY_AIHOSTPORT",
    show_envvar=True,
    help="Port of --aihost.",
)
@click.option(
    "--scan-interval",
    metavar="SECONDS",
    type=click.FloatRange(1.0),
    envvar="LLPROXY_SCAN_INTERVAL",
    show_envvar=True,
    help="Rediscovery period [default: 30].",
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    envvar="LLPROXY_VERBOSE",
    show_envvar=True,
    help="-v: a line per request; -vv: also debug detail.",
)
def serve(
    config_path: str | None,
    bindip: str | None,
    bindport: int | None,
    aihost: str | None,
    aihostport: int | None,
    scan_interval: float | None,
    verbose: int,
) -> None:
    """Discover models and serve them on one OpenAI-compatible endpoint."""
    config = _load(
        config_path,
        bindip=bindip,
        port=bindport,
        aihost=aihost,
        aihostport=aihostport,
        interval_ms=None if scan_interval is None else int(scan_interval * 1000),
    )
    from .logs import setup_logging
    from .server import run

    setup_logging(verbose)
    run(config)


@main.command("scan")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def scan_command(config_path: str | None, as_json: bool) -> None:
    """Run one discovery pass and list the models found."""
    config = _load(config_path)
    from .logs import setup_logging
    from .report import run_scan

    setup_logging(0, stream=sys.stderr)
    sys.exit(run_scan(config, as_json))
