"""Config loading: defaults, every documented key, and errors that name the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llproxy.config import (
    DEFAULT_LOCAL_PORTS,
    EX_CONFIG,
    ConfigError,
    find_config_file,
    load_config,
    parse_config,
    resolve_config,
)
from llproxy.core.mend.policy import Repair

EXAMPLE = Path(__file__).parent.parent / "llproxy.json.example"


def test_original_config_shape_is_accepted() -> None:
    config = parse_config(
        {
            "port": 42069,
            "interval": 30000,
            "endpoints": [
                {"hostname": "10.0.0.5", "port_start": 8000, "port_end": 8010, "tags": ["gpu0"]},
                {"hostname": "127.0.0.1", "port_start": 5000, "port_end": 5005, "enable": False},
                {
                    "url": "https://api.example.com/v1",
                    "apikey": "env:EXAMPLE_API_KEY",
                    "filter": "gpt-4o",
                    "tags": ["cloud"],
                },
                {"url": "http://10.0.0.7:8000/v1", "models": ["my-model"], "tags": ["static"]},
            ],
        },
        environ={"EXAMPLE_API_KEY": "sk-secret"},
    )
    assert config.port == 42069 and config.interval_ms == 30000
    first, disabled, cloud, static = config.endpoints
    assert first.base_urls()[0] == "http://10.0.0.5:8000/v1"
    assert len(first.base_urls()) == 11 and first.tags == ("gpu0",)
    assert disabled.enable is False
    assert cloud.apikey == "sk-secret" and cloud.filter == "gpt-4o"
    assert static.models == ("my-model",)
    assert "sk-secret" not in repr(config)


def test_defaults_scan_the_usual_local_ports() -> None:
    config = parse_config({})
    ports = [e.port_start for e in config.endpoints]
    assert ports == list(DEFAULT_LOCAL_PORTS)
    assert {8080, 8000, 11434, 1234, 5000, 5001, 30000} == set(ports)
    assert all(e.hostname == "127.0.0.1" for e in config.endpoints)
    assert config.bindip == "127.0.0.1" and config.port == 42069
    assert config.max_request_bytes == 10 * 1024 * 1024
    assert config.timeouts.first_byte >= 300  # a model may take minutes to load


def test_every_optional_key() -> None:
    config = parse_config(
        {
            "bindip": "0.0.0.0",
            "workers": 3,
            "reuse_port": False,
            "default_model": "m:gpu0",
            "timeouts": {"connect": 2, "first_byte": 90.5, "idle": 30, "scan": 0.5},
            "max_request_bytes": 2048,
            "endpoints": [],
        }
    )
    assert config.bindip == "0.0.0.0" and config.workers == 3 and not config.reuse_port
    assert config.default_model == "m:gpu0" and config.max_request_bytes == 2048
    assert (config.timeouts.connect, config.timeouts.first_byte) == (2.0, 90.5)
    assert (config.timeouts.idle, config.timeouts.scan) == (30.0, 0.5)


def test_the_example_file_runs_as_it_is(tmp_path: Path) -> None:
    """No secret to set, nothing to edit: a workstation can start from it."""
    config = load_config(EXAMPLE, environ={})
    assert config.endpoints and config.default_model is None
    done = subprocess.run(
        [sys.executable, "-m", "llproxy", "scan", "--json", "--config", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout), list)  # whatever this machine serves


def test_the_optional_parts_in_the_readme_are_valid() -> None:
    """The README's snippet of every optional key parses, with its variables set."""
    readme = (EXAMPLE.parent / "README.md").read_text()
    snippet = readme.split("<!-- optional-config -->", 2)[1]
    data = json.loads(snippet.split("```json", 1)[1].split("```", 1)[0])
    config = parse_config(
        data,
        environ={
            "EXAMPLE_API_KEY": "sk-x",
            "ANTHROPIC_API_KEY": "sk-ant-x",
            "GEMINI_API_KEY": "AIza-x",
            "LLPROXY_STATIC_KEY": "a-static-key-0123456789",
            "LLPROXY_REDIS_URL": "redis://127.0.0.1:6379/0",
            "LLPROXY_DATABASE_URL": "postgresql://llproxy:pw@db.lab:5432/llproxy",
            "LLPROXY_ADMIN_KEY": "an-admin-key-0123456789",
        },
    )
    assert config.admin_key and config.redis_url and config.api_keys
    assert config.database_url == "postgresql://llproxy:pw@db.lab:5432/llproxy"
    # Its password is masked in the log like every secret.
    assert "pw" in config.secrets()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "(top level): must be a JSON object"),
        ({"prot": 1}, "prot: unknown key"),
        ({"port": "80"}, "port: must be an integer port, got a string"),
        ({"port": 0}, "port: must be between 1 and 65535, got 0"),
        ({"port": True}, "port: must be an integer port"),
        ({"interval": 10}, "interval: must be at least 1000 milliseconds"),
        ({"workers": 0}, "workers: must be > 0"),
        ({"reuse_port": 1}, "reuse_port: must be a boolean"),
        ({"bindip": "my host"}, "bindip: must be an IP address"),
        ({"timeouts": {"first_byte": -1}}, "timeouts.first_byte: must be > 0"),
        ({"timeouts": {"total": 5}}, "timeouts.total: unknown key"),
        ({"max_request_bytes": 1.5}, "max_request_bytes: must be an integer"),
        ({"endpoints": {}}, "endpoints: must be a list"),
        ({"repair": {"tool_calls": "yes"}}, "repair.tool_calls: must be a boolean"),
        ({"repair": {"loop": True}}, "repair.loop: unknown key"),
        ({"repair": {"models": {"q*": {"thinking": 1}}}}, "repair.models.q*.thinking: must be"),
        ({"loops": {"repeats": 1}}, "loops.repeats: must be >= 2"),
        ({"loops": {"min_span": 0}}, "loops.min_span: must be > 0"),
        ({"loops": {"min_span": 80, "max_span": 40}}, "loops.max_span: must be >= min_span"),
        (
            {"endpoints": [{"hostname": "h", "port_start": 1, "repair": {"models": {}}}]},
            "endpoints[0].repair.models: unknown key",
        ),
        (
            {"endpoints": [{"operator": "human", "repair": {"thinking": False}}]},
            "endpoints[0].repair: not for an operator endpoint",
        ),
        ({"endpoints": [{"hostname": "h", "port_start": 1}, 5]}, "endpoints[1]: must be an object"),
        (
            {
                "endpoints": [
                    {"hostname": "h", "port_start": 1},
                    {"hostname": "h", "port_start": 8010, "port_end": 8000},
                ]
            },
            "endpoints[1].port_end: must be >= port_start (8010), got 8000",
        ),
        (
            {"endpoints": [{"hostname": "h", "port_start": 70000}]},
            "endpoints[0].port_start: must be between 1 and 65535",
        ),
        (
            {"endpoints": [{"hostname": "h", "port_start": 1, "port_end": 5000}]},
            "endpoints[0].port_end: range of 5000 ports is over the limit of 4096",
        ),
        (
            {"endpoints": [{"hostname": "h", "port_start": 1, "colour": "red"}]},
            "endpoints[0].colour: unknown key",
        ),
        (
            {"endpoints": [{"url": "ftp://x/v1"}]},
            "endpoints[0].url: must be an http:// or https://",
        ),
        ({"endpoints": [{"url": "http://x:99999/v1"}]}, "endpoints[0].url: invalid port"),
        (
            {"endpoints": [{"operator": "human", "max_answer_bytes": 0}]},
            "endpoints[0].max_answer_bytes: must be > 0",
        ),
        (
            {"endpoints": [{"url": "http://x/v1", "max_answer_bytes": 10}]},
            "endpoints[0].max_answer_bytes: only for an operator endpoint",
        ),
        (
            {"endpoints": [{"url": "http://x/v1", "hostname": "x"}]},
            "endpoints[0].hostname: cannot be combined with url",
        ),
        (
            {"endpoints": [{"hostname": "h", "port_start": 1, "models": ["m"]}]},
            "endpoints[0].models: only allowed together with url",
        ),
        ({"endpoints": [{"port_start": 1}]}, "endpoints[0]: needs either url or hostname"),
        ({"endpoints": [{"hostname": "h"}]}, "endpoints[0].port_start: required with hostname"),
        (
            {"endpoints": [{"hostname": "h", "port_start": 1, "tags": "gpu"}]},
            "endpoints[0].tags: must be a list of strings",
        ),
        (
            {"endpoints": [{"hostname": "h", "port_start": 1, "tags": ["a:b"]}]},
            "endpoints[0].tags[0]: must not contain spaces or ':'",
        ),
        (
            {"endpoints": [{"hostname": "h", "port_start": 1, "enable": "no"}]},
            "endpoints[0].enable: must be a boolean",
        ),
        (
            {"endpoints": [{"url": "http://x/v1", "apikey": "env:NOPE_NOT_SET"}]},
            "endpoints[0].apikey: environment variable NOPE_NOT_SET is not set",
        ),
        ({"database_url": "mysql://db/x"}, "database_url: must be a postgresql:// URL"),
        (
            {"database_url": "env:NOPE_NOT_SET"},
            "database_url: environment variable NOPE_NOT_SET is not set",
        ),
    ],
)
def test_bad_config_names_the_field(data: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, environ={})
    assert str(caught.value).startswith(message), str(caught.value)


def test_secret_with_a_line_break_is_refused_without_showing_it() -> None:
    data = {"endpoints": [{"url": "http://x/v1", "apikey": "env:UPSTREAM_KEY"}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, environ={"UPSTREAM_KEY": "sk-secret-value\n"})
    assert str(caught.value).startswith("endpoints[0].apikey: contains a control character")
    assert "sk-secret-value" not in str(caught.value)


def test_disabled_endpoint_may_name_an_unset_variable() -> None:
    config = parse_config(
        {"endpoints": [{"url": "http://x/v1", "apikey": "env:UNSET", "enable": False}]},
        environ={},
    )
    assert config.endpoints[0].apikey is None


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"port": 1,}')
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON"):
        load_config(path)


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    xdg = tmp_path / "xdg"
    (xdg / "llproxy").mkdir(parents=True)
    (xdg / "llproxy" / "llproxy.json").write_text('{"port": 2}')
    env = {"XDG_CONFIG_HOME": str(xdg)}
    assert find_config_file(None, env) == xdg / "llproxy" / "llproxy.json"
    (tmp_path / "llproxy.json").write_text('{"port": 3}')
    assert find_config_file(None, env) == Path("llproxy.json")
    env["LLPROXY_CONFIG"] = str(tmp_path / "env.json")
    assert find_config_file(None, env) == tmp_path / "env.json"
    assert find_config_file("/explicit.json", env) == Path("/explicit.json")
    assert resolve_config(None, {"XDG_CONFIG_HOME": str(xdg)}).port == 3


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_config(str(tmp_path / "missing.json"), {})


def _llproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_bad_config_exits_78_before_binding(tmp_path: Path) -> None:
    path = tmp_path / "llproxy.json"
    path.write_text(
        json.dumps(
            {
                "endpoints": [
                    {"hostname": "127.0.0.1", "port_start": 8000},
                    {"hostname": "127.0.0.1", "port_start": 8010, "port_end": 8000},
                ]
            }
        )
    )
    # Port 1 would need root to bind; the config error must come first regardless.
    done = _llproxy("serve", "--config", str(path), "--bindport", "1")
    assert done.returncode == EX_CONFIG
    assert "endpoints[1].port_end: must be >= port_start" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_config_from_environment_variable(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"port": 1, "nope": true}')
    done = _llproxy("scan", env={"LLPROXY_CONFIG": str(path)})
    assert done.returncode == EX_CONFIG
    assert "nope: unknown key" in done.stderr


def test_aihost_needs_aihostport() -> None:
    done = _llproxy("serve", "--aihost", "127.0.0.1")
    assert done.returncode == EX_CONFIG
    assert "--aihost and --aihostport must be given together" in done.stderr


def test_each_command_needs_only_the_secrets_it_uses(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(
            {
                "endpoints": [{"url": "http://127.0.0.1:9/v1", "apikey": "env:UNSET_UP"}],
                "api_keys": ["env:UNSET_STATIC"],
                "admin_key": "env:UNSET_ADMIN",
                "redis_url": "env:UNSET_REDIS",
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNSET_")}
    env["LLPROXY_STATE_DIR"] = str(tmp_path / "state")

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llproxy", *args, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, **extra},
        )

    for args in (("usage",), ("keys", "list"), ("keys", "create", "--name", "k")):
        done = run(*args)
        assert done.returncode == 0, (args, done.stderr)
    # scan sends the upstream apikeys; nothing else.
    done = run("scan")
    assert done.returncode == 78
    assert "endpoints[0].apikey: environment variable UNSET_UP is not set" in done.stderr
    assert run("scan", UNSET_UP="sk-up").returncode == 0
    # revoke spreads the revocation through Redis.
    done = run("keys", "revoke", "k")
    assert done.returncode == 78 and "redis_url: environment variable UNSET_REDIS" in done.stderr
    # With database_url, every key and usage command needs it.
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "database_url": "env:UNSET_DATABASE"}))
    commands = (("usage",), ("keys", "list"), ("keys", "create", "--name", "j"), ("db", "upgrade"))
    for args in commands:
        done = run(*args)
        assert done.returncode == 78, (args, done.stderr)
        assert "database_url: environment variable UNSET_DATABASE" in done.stderr


def test_repair_switches_by_level() -> None:
    config = parse_config(
        {
            "repair": {"thinking": False, "models": {"qwen3*": {"think_open": True}}},
            "loops": {"min_span": 30},
            "endpoints": [
                {"hostname": "h", "port_start": 1, "port_end": 3, "repair": {"loops": False}},
                {"url": "http://x:8/v1"},
            ],
        }
    )
    mending = config.mending
    assert mending.default == Repair(thinking=False)
    assert mending.models == (("qwen3*", Repair(think_open=True)),)
    assert (mending.loops.min_span, mending.loops.repeats) == (30, 8)
    (endpoint,) = mending.endpoints
    assert endpoint.repair == Repair(loops=False)
    assert endpoint.covers("http://h:2/v1", "h", 2) and not endpoint.covers("http://h:4/v1", "h", 4)
