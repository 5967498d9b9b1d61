"""The admin REST API: off without admin_key; keys and usage with it; constant-time auth."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llproxy.config import ConfigError, parse_config

from .conftest import ProxyFactory, RunningProxy, RunningUpstream

ADMIN = "admin-secret-0123456789"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


async def call(
    proxy: RunningProxy, method: str, path: str, body: Any = None, token: str | None = ADMIN
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"{proxy.url}{path}", json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_admin_api_is_off_without_admin_key(proxy: RunningProxy) -> None:
    status, body = await call(proxy, "GET", "/admin/keys")
    assert status == 404 and body["error"]["code"] == "not_found"


@pytest.mark.parametrize("token", [None, "wrong", ADMIN + "x", ADMIN[:-1]])
async def test_admin_api_needs_the_admin_key(
    start_proxy: ProxyFactory, upstream: RunningUpstream, token: str | None
) -> None:
    proxy = await start_proxy([upstream.endpoint()], admin_key=ADMIN)
    for method, path in (
        ("GET", "/admin/keys"),
        ("POST", "/admin/keys"),
        ("DELETE", "/admin/keys/x"),
        ("GET", "/admin/usage"),
    ):
        status, body = await call(proxy, method, path, {"name": "x"}, token=token)
        assert status == 401 and body["error"]["code"] == "invalid_admin_key"


async def test_keys_and_usage_through_the_admin_api(
    start_proxy: ProxyFactory, upstream: RunningUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy([upstream.endpoint()], admin_key=ADMIN)
    status, created = await call(
        proxy,
        "POST",
        "/admin/keys",
        {"name": "web", "models": ["fake-*"], "rate_limit": "5 per minute"},
    )
    assert status == 201 and created["name"] == "web" and created["key"].startswith("llp-")
    status, body = await call(proxy, "POST", "/admin/keys", {"name": "web"})
    assert status == 400 and body["error"]["code"] == "key_exists"
    for bad, param in (
        ({"name": ""}, "name"),
        ({"name": "a", "models": "x"}, "models"),
        ({"name": "a", "rate_limit": "lots"}, "rate_limit"),
        ({"name": "a", "expires": "soon"}, "expires"),
    ):
        status, body = await call(proxy, "POST", "/admin/keys", bad)
        assert status == 400 and body["error"]["param"] == param
    status, listing = await call(proxy, "GET", "/admin/keys")
    assert [(k["name"], k["models"], k["rate_limit"], k["status"]) for k in listing["data"]] == [
        ("web", ["fake-*"], "5 per minute", "active")
    ]
    assert created["key"] not in str(listing)

    # The new key works for the API within the reload period, and counts usage.
    deadline = time.monotonic() + 10
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.post(
                f"{proxy.url}/v1/chat/completions",
                json=CHAT,
                headers={"Authorization": f"Bearer {created['key']}"},
            ) as r:
                if r.status == 200 or time.monotonic() > deadline:
                    assert r.status == 200
                    break
            await asyncio.sleep(0.2)
    deadline = time.monotonic() + 10
    while True:
        status, usage = await call(proxy, "GET", "/admin/usage?by=key")
        if usage["data"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert usage["data"] == [
        {"client": "web", "requests": 1, "prompt_tokens": 7, "completion_tokens": 5, "cut": 0}
    ]
    status, body = await call(proxy, "GET", "/admin/usage?by=week")
    assert status == 400 and body["error"]["param"] == "by"

    status, body = await call(proxy, "DELETE", "/admin/keys/web")
    assert status == 200 and body == {"name": "web", "revoked": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}/v1/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {created['key']}"},
        ) as r,
    ):
        assert r.status == 401
    status, body = await call(proxy, "DELETE", "/admin/keys/web")
    assert status == 404 and body["error"]["code"] == "key_not_found"


def test_admin_key_must_be_long() -> None:
    with pytest.raises(ConfigError, match="admin_key: must be at least 16 characters"):
        parse_config({"admin_key": "short"})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "../x"}, "name"),
        ({"name": "x" * 100_000}, "name"),
        ({"name": "ok\r\nforged: line"}, "name"),
        ({"name": "a\nb"}, "name"),
        ({"name": " lead"}, "name"),
        ({"name": "ok", "expires": 1}, "expires"),
        ({"name": "ok", "expires": 1e300}, "expires"),
        ({"name": "ok", "models": ["a\nb"]}, "models"),
        ({"name": "ok", "models": ["x" * 201]}, "models"),
        ({"name": "ok", "models": ["m"] * 101}, "models"),
    ],
)
async def test_admin_refuses_unsafe_key_fields(
    start_proxy: ProxyFactory, upstream: RunningUpstream, body: dict[str, Any], param: str
) -> None:
    proxy = await start_proxy([upstream.endpoint()], admin_key=ADMIN)
    status, answer = await call(proxy, "POST", "/admin/keys", body)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param
    status, listed = await call(proxy, "GET", "/admin/keys")
    assert listed["data"] == []  # nothing was stored
