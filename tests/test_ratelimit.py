"""Rate limits: exact per client, per key, across workers, across instances sharing Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from llproxy.config import ConfigError, parse_config

from .conftest import ProxyFactory, RunningUpstream, UpstreamFactory, write_config
from .process import LlproxyProcess, create_key, run_cli

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
Start = Callable[..., Awaitable[LlproxyProcess]]


async def post(url: str, **headers: str) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/v1/chat/completions", json=CHAT, headers={"Connection": "close", **headers}
        ) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


async def test_limit_is_exact_with_headers_and_429(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    proxy = await start_proxy([upstream.endpoint()], rate_limit="3 per minute")
    seen = [await post(proxy.url) for _ in range(3)]
    assert [s for s, _, _ in seen] == [200, 200, 200]
    assert [h["x-ratelimit-remaining-requests"] for _, h, _ in seen] == ["2", "1", "0"]
    assert all(h["x-ratelimit-limit-requests"] == "3" for _, h, _ in seen)
    assert all(h["x-ratelimit-reset-requests"].endswith("s") for _, h, _ in seen)
    status, headers, body = await post(proxy.url)
    assert status == 429
    assert body["error"]["type"] == "requests" and body["error"]["code"] == "rate_limit_exceeded"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert len(upstream.fake.generation_requests) == 3  # the refused one never went upstream
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    async with client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(**CHAT)


async def test_null_disables_limits(start_proxy: ProxyFactory, upstream: RunningUpstream) -> None:
    proxy = await start_proxy([upstream.endpoint()], rate_limit=None)
    status, headers, _ = await post(proxy.url)
    assert status == 200 and "x-ratelimit-limit-requests" not in headers


def test_default_and_bad_limits() -> None:
    assert parse_config({}).rate_limit == "1000 per 15 minutes"
    with pytest.raises(ConfigError, match="rate_limit: must be like '60 per minute'"):
        parse_config({"rate_limit": "lots"})
    with pytest.raises(ConfigError, match=r"trusted_proxies\[0\]: must be an IP address"):
        parse_config({"trusted_proxies": ["proxy.example"]})
    with pytest.raises(ConfigError, match="redis_url: must be a redis://"):
        parse_config({"redis_url": "http://x"})


async def test_forged_forwarded_for_does_not_escape_a_limit(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    proxy = await start_proxy([upstream.endpoint()], rate_limit="2 per minute")
    statuses = [(await post(proxy.url, **{"X-Forwarded-For": f"10.0.0.{i}"}))[0] for i in range(4)]
    assert statuses == [200, 200, 429, 429]


async def test_forwarded_for_counts_only_from_trusted_proxies(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    proxy = await start_proxy(
        [upstream.endpoint()], rate_limit="2 per minute", trusted_proxies=["127.0.0.0/8"]
    )
    # Behind a trusted proxy, each real client has its own counter...
    for client in ("203.0.113.7", "203.0.113.8"):
        statuses = [(await post(proxy.url, **{"X-Forwarded-For": client}))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
    # ...and a client cannot pick one: the proxy appends the real address on the right.
    statuses = [
        (await post(proxy.url, **{"X-Forwarded-For": f"10.1.1.{i}, 203.0.113.9"}))[0]
        for i in range(3)
    ]
    assert statuses == [200, 200, 429]


async def test_per_key_limits(
    start_proxy: ProxyFactory, upstream: RunningUpstream, tmp_path: Path
) -> None:
    state = tmp_path / "state"

    tight = create_key(state, "tight", "--rate-limit", "1 per minute")
    loose = create_key(state, "loose")
    proxy = await start_proxy(
        [upstream.endpoint()], state_dir=str(state), rate_limit="3 per minute"
    )
    tight_statuses = [(await post(proxy.url, Authorization=f"Bearer {tight}"))[0] for _ in range(2)]
    loose_statuses = [(await post(proxy.url, Authorization=f"Bearer {loose}"))[0] for _ in range(4)]
    assert tight_statuses == [200, 429]
    assert loose_statuses == [200, 200, 200, 429]  # its own counter, the config's limit
    bad = run_cli("keys", "create", "--name", "x", "--rate-limit", "often", state=state)
    assert bad.returncode == 2 and "--rate-limit: must be like" in bad.stderr


async def burst(url: str, total: int) -> list[int]:
    """`total` requests on fresh connections, a few at a time, so every worker gets some."""
    statuses: list[int] = []
    while len(statuses) < total:
        batch = await asyncio.gather(*(post(url) for _ in range(min(5, total - len(statuses)))))
        statuses.extend(s for s, _, _ in batch)
    return statuses


async def test_limit_is_exact_across_workers(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream()
    config = write_config(tmp_path / "c.json", [upstream], rate_limit="10 per minute")
    daemon = await start_llproxy("--config", str(config), "--workers", "2", "-v")
    statuses = await burst(daemon.url, 30)
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    await daemon.wait_for(r"w1 POST /v1/chat/completions")
    await daemon.wait_for(r"w2 POST /v1/chat/completions")  # both workers took requests
    assert len(upstream.fake.generation_requests) == 10


async def test_instances_sharing_redis_share_a_limit(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path, redis_url: str
) -> None:
    upstream = await start_upstream()
    config = write_config(
        tmp_path / "c.json", [upstream], rate_limit="6 per minute", redis_url=redis_url
    )
    first = await start_llproxy("--config", str(config), "--workers", "1")
    second = await start_llproxy("--config", str(config), "--workers", "2")
    statuses = []
    for _ in range(6):
        statuses.extend([(await post(first.url))[0], (await post(second.url))[0]])
    assert statuses.count(200) == 6 and statuses.count(429) == 6
    assert len(upstream.fake.generation_requests) == 6


async def test_redis_down_refuses_instead_of_counting_nothing(
    start_proxy: ProxyFactory, upstream: RunningUpstream
) -> None:
    proxy = await start_proxy([upstream.endpoint()], redis_url="redis://127.0.0.1:1/0")
    status, _, body = await post(proxy.url)
    assert status == 503 and body["error"]["code"] == "service_unavailable"
    assert upstream.fake.generation_requests == []


async def test_revocation_is_shared_through_redis(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path, redis_url: str
) -> None:
    upstream = await start_upstream()
    config = write_config(tmp_path / "c.json", [upstream], redis_url=redis_url)
    here, there = tmp_path / "here", tmp_path / "there"
    secret = create_key(here, "shared")
    there.mkdir()
    # Keys are provisioned per host: the other host got a copy of the same key.
    (there / "llproxy.db").write_bytes((here / "llproxy.db").read_bytes())
    first = await start_llproxy(
        "--config", str(config), "--workers", "1", env={"LLPROXY_STATE_DIR": str(here)}
    )
    second = await start_llproxy(
        "--config", str(config), "--workers", "1", env={"LLPROXY_STATE_DIR": str(there)}
    )
    auth = {"Authorization": f"Bearer {secret}"}
    assert (await post(first.url, **auth))[0] == 200
    assert (await post(second.url, **auth))[0] == 200
    done = run_cli("keys", "revoke", "shared", "--config", str(config), state=here)
    assert done.returncode == 0, done.stderr
    # The other instance never saw its own database change, yet refuses within seconds;
    # each reads keys every 2 s on its own clock, so either may be the first to refuse.
    deadline = asyncio.get_running_loop().time() + 10
    for instance in (second, first):
        while (await post(instance.url, **auth))[0] != 401:
            assert asyncio.get_running_loop().time() < deadline, "revocation did not spread"
            await asyncio.sleep(0.2)


async def test_a_burst_with_a_healthy_redis_is_never_refused(
    start_proxy: ProxyFactory, upstream: RunningUpstream, redis_url: str
) -> None:
    """200 requests at once, more than a worker's Redis connections: they wait for one,
    none gets a 503; and the count is exact."""
    proxy = await start_proxy(
        [upstream.endpoint()], redis_url=redis_url, rate_limit="150 per minute"
    )
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with session.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert statuses.count(200) == 150 and statuses.count(429) == 50
    assert statuses.count(503) == 0
    assert len(upstream.fake.generation_requests) == 150
