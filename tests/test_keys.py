"""Client API keys: the CLI, the SQLite store, authentication, per-key models, live changes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from llproxy.config import EX_CONFIG, ConfigError, parse_config
from llproxy.core.keys import KeyRing, key_hash
from llproxy.stores.sqlite import DATABASE, KeyStore, StoredKeys

from .conftest import ProxyFactory, RunningProxy, RunningUpstream, UpstreamFactory, write_config
from .process import LlproxyProcess, create_key, run_cli

CHAT = [{"role": "user", "content": "hi"}]
Start = Callable[..., Awaitable[LlproxyProcess]]


def test_create_prints_only_the_secret_and_stores_only_a_hash(tmp_path: Path) -> None:
    done = run_cli("keys", "create", "--name", "ci", state=tmp_path)
    assert done.returncode == 0
    secret = done.stdout.strip()
    assert done.stdout == secret + "\n"  # alone on stdout: KEY=$(llproxy keys create ...)
    assert secret.startswith("llp-") and len(secret) >= 4 + 43  # 256 random bits
    assert "ci" in done.stderr
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert secret.encode() not in stored
    assert key_hash(secret).encode() in stored
    assert oct((tmp_path / DATABASE).stat().st_mode & 0o777) == "0o600"

    again = run_cli("keys", "create", "--name", "ci", state=tmp_path)
    assert again.returncode != 0 and "exists already" in again.stderr


def test_list_and_revoke(tmp_path: Path) -> None:
    secret = create_key(tmp_path, "alice", "--models", "llama*,qwen*", "--expires", "2099-01-01")
    create_key(tmp_path, "bob")
    rows = json.loads(run_cli("keys", "list", "--json", state=tmp_path).stdout)
    assert [(r["name"], r["status"], r["models"]) for r in rows] == [
        ("alice", "active", ["llama*", "qwen*"]),
        ("bob", "active", []),
    ]
    assert rows[0]["fingerprint"] == key_hash(secret)[:8]
    assert rows[0]["expires"] > time.time()
    table = run_cli("keys", "list", state=tmp_path).stdout
    assert "alice" in table and secret not in table
    assert run_cli("keys", "revoke", "bob", state=tmp_path).returncode == 0
    rows = json.loads(run_cli("keys", "list", "--json", state=tmp_path).stdout)
    assert rows[1]["status"] == "revoked"
    missing = run_cli("keys", "revoke", "bob", state=tmp_path)
    assert missing.returncode != 0 and "no active key named 'bob'" in missing.stderr


def stored_ring(directory: Path) -> KeyRing:
    """A process's key ring as its store reads the database."""
    ring = KeyRing()
    stored = StoredKeys(directory)
    ring.replace(stored.changed() or [])
    stored.close()
    return ring


def test_key_ring_checks_status(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    live = store.create("live")
    # A key cannot be created expired: this one expires a moment after.
    expiry = time.time() + 0.3
    old = store.create("old", expires=expiry)
    gone = store.create("gone")
    store.revoke("gone")
    while time.time() <= expiry:
        time.sleep(0.05)
    ring = stored_ring(tmp_path)
    assert ring.enabled
    assert ring.authenticate(live) is not None and ring.authenticate(live).name == "live"  # type: ignore[union-attr]
    assert ring.authenticate(old) is None
    assert ring.authenticate(gone) is None
    assert ring.authenticate(live + "x") is None
    store.close()


def test_a_revoked_last_key_keeps_the_proxy_closed(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.create("only")
    store.revoke("only")
    ring = stored_ring(tmp_path)
    assert ring.enabled  # revoking every key must not reopen the door
    store.close()


def test_static_keys_in_the_config() -> None:
    config = parse_config(
        {"api_keys": ["a-static-key-of-20-ch", "env:K"]}, environ={"K": "another-static-key-xx"}
    )
    assert config.api_keys == ("a-static-key-of-20-ch", "another-static-key-xx")
    assert "a-static" not in repr(config)
    with pytest.raises(ConfigError, match=r"api_keys\[0\]: must be at least 16 characters"):
        parse_config({"api_keys": ["short"]})


async def status_of(
    proxy: RunningProxy, path: str = "/v1/models", **headers: str
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy.url}{path}", headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_requests_need_a_key_once_one_exists(
    start_proxy: ProxyFactory, upstream: RunningUpstream, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    secret = create_key(state, "ci")
    proxy = await start_proxy([upstream.endpoint()], state_dir=str(state))
    status, body = await status_of(proxy)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert "API key is required" in body["error"]["message"]
    status, body = await status_of(proxy, Authorization="Bearer llp-wrong")
    assert status == 401 and body["error"]["message"] == "Incorrect API key provided"
    assert (await status_of(proxy, Authorization=f"Bearer {secret}"))[0] == 200
    assert (await status_of(proxy, **{"x-api-key": secret}))[0] == 200
    # /health stays open for load balancers.
    assert (await status_of(proxy, "/health"))[0] == 200

    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=secret, max_retries=0)
    async with client:
        reply = await client.chat.completions.create(model="fake-model", messages=CHAT)
        assert reply.choices[0].message.content
    bad = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="nope", max_retries=0)
    async with bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            await bad.chat.completions.create(model="fake-model", messages=CHAT)
    assert caught.value.code == "invalid_api_key"
    # The client's key never reaches the upstream.
    assert len(upstream.fake.generation_requests) == 1
    assert all(secret not in str(r.headers) for r in upstream.fake.received)


async def test_key_models_limit_what_it_sees_and_uses(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await start_upstream(model_ids=["llama-3-8b", "qwen2-7b", "mistral-7b"])
    state = tmp_path / "state"
    limited = create_key(state, "limited", "--models", "llama*,qwen*")
    everything = create_key(state, "all")
    proxy = await start_proxy([upstream.endpoint()], state_dir=str(state))
    _, body = await status_of(proxy, Authorization=f"Bearer {limited}")
    assert [m["id"] for m in body["data"]] == ["llama-3-8b", "qwen2-7b"]
    _, body = await status_of(proxy, Authorization=f"Bearer {everything}")
    assert len(body["data"]) == 3
    status, body = await status_of(
        proxy, "/v1/models/mistral-7b", Authorization=f"Bearer {limited}"
    )
    assert status == 403 and body["error"]["code"] == "model_not_allowed"

    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=limited, max_retries=0)
    async with client:
        await client.chat.completions.create(model="qwen2-7b", messages=CHAT)
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client.chat.completions.create(model="mistral-7b", messages=CHAT)
    assert caught.value.code == "model_not_allowed"
    assert [r.body["model"] for r in upstream.fake.generation_requests] == ["qwen2-7b"]


async def test_static_keys_authenticate(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    proxy = await start_proxy([upstream.endpoint()], api_keys=["static-secret-0123456789"])
    assert (await status_of(proxy))[0] == 401
    assert (await status_of(proxy, Authorization="Bearer static-secret-0123456789"))[0] == 200


async def test_keys_created_and_revoked_while_serving(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream()
    config = write_config(tmp_path / "c.json", [upstream])
    state = tmp_path / "state"
    daemon = await start_llproxy(
        "--config", str(config), "--workers", "2", "-v", env={"LLPROXY_STATE_DIR": str(state)}
    )

    async def models_status(secret: str | None) -> int:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{daemon.url}/v1/models", headers={**headers, "Connection": "close"}
            ) as resp,
        ):
            return resp.status

    async def settles(secret: str | None, status: int) -> None:
        # Every worker must agree: sample over fresh connections for a while.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all([await models_status(secret) == status for _ in range(6)]):
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"status never settled on {status}")

    await settles(None, 200)  # no key yet: open (on loopback)
    secret = create_key(state, "late")
    await settles(None, 401)
    await settles(secret, 200)
    assert run_cli("keys", "revoke", "late", state=state).returncode == 0
    await settles(secret, 401)
    # The state directory deleted: the keys last read stay in force, the proxy closed.
    other = create_key(state, "other")
    await settles(other, 200)
    shutil.rmtree(state)
    await asyncio.sleep(2.5)  # past the workers' reload period
    await settles(None, 401)
    await settles(other, 200)
    # Made anew with a new key: that database is the one read from now on.
    renewed = create_key(state, "renewed")
    await settles(renewed, 200)
    await settles(other, 401)
    daemon.signal(signal.SIGTERM)
    await daemon.wait_exit()
    # Logs name the key and its fingerprint, never the secret.
    assert f"late({key_hash(secret)[:8]})" in daemon.output
    assert secret not in daemon.output
    assert secret.encode() not in b"".join(p.read_bytes() for p in state.iterdir())


async def test_non_loopback_bind_needs_keys_or_allow_open(
    start_llproxy: Start, tmp_path: Path
) -> None:
    config = tmp_path / "c.json"
    config.write_text('{"endpoints": [], "bindip": "0.0.0.0"}')
    state = tmp_path / "state"
    refused = run_cli("serve", "--config", str(config), state=state)
    assert refused.returncode == EX_CONFIG
    assert "refusing to serve on 0.0.0.0 without API keys" in refused.stderr
    daemon = await start_llproxy(
        "--config",
        str(config),
        "--workers",
        "1",
        "--allow-open",
        env={"LLPROXY_STATE_DIR": str(state)},
    )
    await daemon.wait_for("serving on http://0.0.0.0")
    create_key(state, "ops")
    with_key = await start_llproxy(
        "--config", str(config), "--workers", "1", env={"LLPROXY_STATE_DIR": str(state)}
    )
    await with_key.wait_for("serving on http://0.0.0.0")


def test_non_loopback_bind_refused_while_the_shared_keys_cannot_be_read(
    tmp_path: Path, unused_tcp_port: int
) -> None:
    # Whether any key exists is unknown while the database does not answer: were it to
    # hold none, the address would serve everyone.
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(
            {
                "endpoints": [],
                "bindip": "0.0.0.0",
                "database_url": f"postgresql://llproxy@127.0.0.1:{unused_tcp_port}/llproxy",
            }
        )
    )
    refused = run_cli("serve", "--config", str(config), state=tmp_path / "state")
    assert refused.returncode == 69, refused.stderr
    assert "refusing to serve on 0.0.0.0: cannot read the keys" in refused.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--name", "a\nforged"), "--name"),
        (("--name", "../etc"), "--name"),
        (("--name", "x" * 65), "--name"),
        (("--name", "ok", "--expires", "2001-01-01"), "--expires"),
    ],
)
def test_cli_refuses_unsafe_key_fields(tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    done = run_cli("keys", "create", *args, state=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert says in done.stderr


def test_keys_table_puts_each_value_under_its_column(tmp_path: Path) -> None:
    # Piped with no COLUMNS, and wider than 80 columns: nothing may be cut to fit.
    models = "llama-3.1-70b-instruct*,qwen2.5-coder-32b*"
    create_key(
        tmp_path,
        "alice-in-the-research-lab",
        "--models",
        models,
        "--rate-limit",
        "5 per minute",
        "--expires",
        "2099-01-01",
    )
    done = subprocess.run(
        [sys.executable, "-m", "llproxy", "keys", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        | {"LLPROXY_STATE_DIR": str(tmp_path)},
    )
    lines = done.stdout.splitlines()
    header = next(line for line in lines if "fingerprint" in line)
    row = next(line for line in lines if "alice" in line)
    columns = [cell.strip() for cell in header.split("┃")[1:-1]]
    cells = dict(zip(columns, (cell.strip() for cell in row.split("│")[1:-1]), strict=True))
    assert cells["name"] == "alice-in-the-research-lab"
    assert cells["models"] == models.replace(",", ", ")
    assert cells["rate limit"] == "5 per minute"
    assert cells["status"] == "active"
    assert cells["expires"].startswith("2099-01-01")
    assert cells["created"].startswith(time.strftime("%Y-"))
