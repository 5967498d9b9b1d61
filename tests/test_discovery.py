"""Discovery against real servers on loopback: ranges, tags, replicas, filters, rescans."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llproxy.backends.openai_http.discovery import make_scan_session, scan
from llproxy.config import parse_config
from llproxy.core.call import via_hops

from .conftest import ProxyFactory, UpstreamFactory, free_port_block, scenario_endpoint
from .scenario_upstream import ScenarioUpstream


async def test_scan_finds_servers_in_a_range(
    start_upstream: UpstreamFactory, aiohttp_server: Any
) -> None:
    low = free_port_block(5)
    high = low + 4
    first = await start_upstream(port=low + 1, model_ids=["org/a.gguf"])
    await start_upstream(port=high, model_ids=["b", "c"])
    config = parse_config(
        {
            "endpoints": [
                {"hostname": "127.0.0.1", "port_start": low, "port_end": high, "tags": ["lab"]}
            ]
        }
    )
    async with make_scan_session(config) as session:
        result = await scan(config, session)
    assert result.probed == high - low + 1
    assert result.registry.servers == 2
    assert sorted(result.registry.models) == ["a:lab", "b:lab", "c:lab"]
    replica = result.registry.models["a:lab"].replicas[0]
    assert replica.upstream_id == "org/a.gguf" and replica.upstream.port == first.port
    assert result.new == ("a:lab", "b:lab", "c:lab") and result.gone == ()


async def test_several_tags_and_disabled_endpoints(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    tagged = await start_upstream(model_ids=["m"])
    disabled = await start_upstream(model_ids=["hidden"])
    proxy = await start_proxy(
        [
            tagged.endpoint(tags=["gpu0", "fast"]),
            disabled.endpoint(enable=False),
        ]
    )
    models = await proxy.client().models.list()
    assert [m.id for m in models.data] == ["m:fast", "m:gpu0"]
    assert disabled.fake.listing_requests == 0


async def test_filter_and_fixed_model_list(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    cloud = await start_upstream(model_ids=["gpt-4o", "gpt-4o-mini", "o1", "text-embed"])
    static = await start_upstream(model_ids=["ignored"])
    proxy = await start_proxy(
        [
            {"url": f"http://127.0.0.1:{cloud.port}/v1", "filter": "gpt-4o", "tags": ["cloud"]},
            {
                "url": f"http://127.0.0.1:{static.port}/v1",
                "models": ["my-model"],
                "tags": ["static"],
            },
        ]
    )
    names = [m.id for m in (await proxy.client().models.list()).data]
    assert names == ["gpt-4o-mini:cloud", "gpt-4o:cloud", "my-model:static"]
    assert static.fake.listing_requests == 0  # a fixed list skips the /v1/models call
    reply = await proxy.client().chat.completions.create(
        model="my-model:static", messages=[{"role": "user", "content": "x"}]
    )
    assert reply.choices[0].message.content
    assert static.fake.generation_requests[-1].body["model"] == "my-model"


async def test_tabbyapi_only_the_loaded_model_counts(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    tabby = await start_upstream(
        model_ids=["on-disk-1", "loaded-one", "on-disk-2"], loaded_model="loaded-one"
    )
    proxy = await start_proxy([tabby.endpoint()])
    assert [m.id for m in (await proxy.client().models.list()).data] == ["loaded-one"]


async def test_same_name_on_several_servers_is_one_model_with_replicas(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    one = await start_upstream(model_ids=["org/shared.gguf"])
    two = await start_upstream(model_ids=["other/shared"])
    proxy = await start_proxy([one.endpoint(), two.endpoint()])
    model = proxy.state.registry.get("shared")
    assert model is not None
    assert sorted(r.upstream.port for r in model.replicas) == sorted([one.port, two.port])
    assert {r.upstream_id for r in model.replicas} == {"org/shared.gguf", "other/shared"}
    assert [m.id for m in (await proxy.client().models.list()).data] == ["shared"]


async def test_rediscovery_adds_and_drops(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    low = free_port_block(3)
    high = low + 2
    first = await start_upstream(port=low, model_ids=["first"])
    second = await start_upstream(port=high, model_ids=["second"])
    second.fake.model_ids = []  # up, but serving nothing yet
    proxy = await start_proxy([{"hostname": "127.0.0.1", "port_start": low, "port_end": high}])
    client = proxy.client()
    assert [m.id for m in (await client.models.list()).data] == ["first"]

    second.fake.model_ids = ["second"]
    await proxy.rescan()
    assert [m.id for m in (await client.models.list()).data] == ["first", "second"]

    await first.server.close()
    await proxy.rescan()
    assert [m.id for m in (await client.models.list()).data] == ["second"]
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/health") as resp:
        assert (await resp.json())["models"] == 1


async def test_periodic_rescan_picks_up_new_models(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream(model_ids=["before"])
    proxy = await start_proxy([upstream.endpoint()], interval=1000)
    upstream.fake.model_ids = ["after"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if "after" in proxy.state.registry.models:
            break
        await asyncio.sleep(0.1)
    assert list(proxy.state.registry.models) == ["after"]


async def test_scan_of_thousands_of_closed_ports_does_not_hang() -> None:
    low = 20000  # below the ephemeral range: mostly closed; what is open does not matter here
    config = parse_config(
        {"endpoints": [{"hostname": "127.0.0.1", "port_start": low, "port_end": low + 4095}]}
    )
    started = time.monotonic()
    async with make_scan_session(config) as session:
        result = await scan(config, session)
    assert result.probed == 4096
    assert time.monotonic() - started < 30  # did not hang; speed is for `make bench`


async def test_non_openai_servers_are_ignored(aiohttp_server: Any) -> None:
    from aiohttp import web

    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    async def wrong_shape(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"name": "no id"}, 5, {"id": ""}]})

    servers = []
    for handler in (html, wrong_shape):
        app = web.Application()
        app.router.add_get("/v1/models", handler)
        servers.append(await aiohttp_server(app))
    config = parse_config(
        {
            "endpoints": [
                {"hostname": "127.0.0.1", "port_start": s.port, "port_end": s.port} for s in servers
            ]
        }
    )
    async with make_scan_session(config) as session:
        result = await scan(config, session)
    assert result.registry.models == {}
    assert result.registry.servers == 1  # the JSON one is a server, with no usable model


async def test_a_range_on_a_host_name_is_resolved_and_probed(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    # Where `localhost` resolves to ::1 first, the 127.0.0.1-only fake is still found
    # (each address is tried); this machine may resolve it to 127.0.0.1 alone.
    upstream = await start_upstream(model_ids=["by-name"])
    proxy = await start_proxy(
        [{"hostname": "localhost", "port_start": upstream.port, "port_end": upstream.port}]
    )
    assert list(proxy.state.registry.models) == ["by-name"]


async def test_a_server_that_refuses_the_key_is_named_with_its_reason(
    start_upstream: UpstreamFactory,
) -> None:
    locked = await start_upstream(require_key="sk-right")
    config = parse_config(
        {"endpoints": [locked.endpoint(apikey="env:TEST_KEY")]}, environ={"TEST_KEY": "sk-wrong"}
    )
    async with make_scan_session(config) as session:
        result = await scan(config, session)
    assert result.registry.models == {}
    [problem] = result.problems
    assert problem.address == f"http://127.0.0.1:{locked.port}/v1"
    assert problem.reason == "refused the model list: HTTP 401 Unauthorized: Invalid API key"
    assert problem.describe().endswith("; check its apikey")


async def test_a_configured_url_that_fails_is_reported_but_closed_ports_are_not(
    start_upstream: UpstreamFactory,
) -> None:
    closed = free_port_block(1)
    config = parse_config(
        {
            "endpoints": [
                {"url": f"http://127.0.0.1:{closed}/v1"},
                {"hostname": "127.0.0.1", "port_start": closed, "port_end": closed},
            ]
        }
    )
    async with make_scan_session(config) as session:
        result = await scan(config, session)
    [problem] = result.problems
    assert problem.address == f"http://127.0.0.1:{closed}/v1"
    assert problem.reason.startswith("refused the model list: ")


async def test_rescans_log_only_what_changed_by_name(
    start_upstream: UpstreamFactory, caplog: pytest.LogCaptureFixture
) -> None:
    from llproxy.backends.openai_http.discovery import DiscoveryLoop

    upstream = await start_upstream(model_ids=["a", "b"])
    config = parse_config(
        {
            "endpoints": [upstream.endpoint()],
            "default_model": "c",
            "aliases": {"gpt-4o": "a", "claude-*": "c"},
        }
    )
    loop = DiscoveryLoop(config, lambda result: None)
    await loop.start()
    caplog.set_level(logging.INFO, logger="llproxy.discovery")
    try:
        await loop.scan_now()
        await loop.scan_now()
        await loop.scan_now()
        upstream.fake.model_ids = ["a", "c"]
        await loop.scan_now()
        await loop.scan_now()
    finally:
        await loop.stop()
    lines = [record.getMessage() for record in caplog.records]
    assert re.fullmatch(r"scan: 1 servers, 2 models in \d+ ms", lines[0])
    assert lines[1:] == [
        "default_model 'c' is not among the 2 models found",
        "the target 'c' of alias 'claude-*' is not among the 2 models found",
        "scan: new c; gone b (now 1 servers, 2 models)",
        "default_model 'c' is available now",
        "the target 'c' of alias 'claude-*' is available now",
    ]


async def test_a_slow_listing_keeps_the_models_for_a_few_scans(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream(model_ids=["steady"])
    proxy = await start_proxy(
        [upstream.endpoint()], timeouts={"scan": 0.3}, discovery={"forget_after": 3}
    )
    client = proxy.client()
    assert [m.id for m in (await client.models.list()).data] == ["steady"]

    upstream.fake.listing_delay = 5  # still serving completions, but lists too slowly
    for _ in range(2):
        await proxy.rescan()
        assert [m.id for m in (await client.models.list()).data] == ["steady"]
        reply = await client.chat.completions.create(
            model="steady", messages=[{"role": "user", "content": "x"}]
        )
        assert reply.choices[0].message.content
    await proxy.rescan()  # the third failed scan in a row: now it counts as gone
    assert [m.id for m in (await client.models.list()).data] == []

    upstream.fake.listing_delay = 0
    await proxy.rescan()
    assert [m.id for m in (await client.models.list()).data] == ["steady"]


async def test_what_the_log_says_of_a_slow_listing(
    start_upstream: UpstreamFactory, caplog: pytest.LogCaptureFixture
) -> None:
    from llproxy.backends.openai_http.discovery import DiscoveryLoop

    upstream = await start_upstream(model_ids=["steady"])
    config = parse_config(
        {
            "endpoints": [upstream.endpoint()],
            "timeouts": {"scan": 0.3},
            "discovery": {"forget_after": 2},
        }
    )
    loop = DiscoveryLoop(config, lambda result: None)
    await loop.start()
    caplog.set_level(logging.INFO, logger="llproxy.discovery")
    try:
        await loop.scan_now()
        for delay in (5, 0, 5, 5, 0):  # slow, back, slow twice (forgotten), back
            upstream.fake.listing_delay = delay
            await loop.scan_now()
    finally:
        await loop.stop()
    address = f"http://127.0.0.1:{upstream.port}/v1"
    kept = (
        f"server {address} did not list its models (refused the model list: no answer "
        "within 0.3 s); they are kept until 2 scans in a row fail"
    )
    assert [record.getMessage() for record in caplog.records][1:] == [
        kept,
        f"server {address} answers again",
        kept,
        "scan: gone steady (now 0 servers, 0 models)",
        "scan: new steady (now 1 servers, 1 models)",
    ]


async def test_a_slow_props_keeps_the_context_it_said_before(
    scenario: ScenarioUpstream, start_proxy: ProxyFactory
) -> None:
    # llama.cpp: /props says what a slot holds; the listing's meta only the training size.
    scenario.n_ctx_train, scenario.n_ctx = 131072, 8192
    proxy = await start_proxy([scenario_endpoint(scenario)], timeouts={"scan": 0.3})
    assert proxy.state.registry.models["fake-model"].context_length == 8192
    scenario.props_delay = 1  # past timeouts.scan
    await proxy.rescan()
    assert proxy.state.registry.models["fake-model"].context_length == 8192
    scenario.props_delay, scenario.n_ctx = 0, 4096  # it answers again, with a new size
    await proxy.rescan()
    assert proxy.state.registry.models["fake-model"].context_length == 4096


async def test_a_listing_that_recovers_starts_the_count_again(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream(model_ids=["steady"])
    proxy = await start_proxy(
        [upstream.endpoint()], timeouts={"scan": 0.3}, discovery={"forget_after": 2}
    )
    for delay in (5, 0, 5, 0, 5):  # never two failures in a row
        upstream.fake.listing_delay = delay
        await proxy.rescan()
        assert list(proxy.state.registry.models) == ["steady"]
    await proxy.rescan()
    assert list(proxy.state.registry.models) == []


async def test_two_llproxies_that_scan_each_other(
    start_upstream: UpstreamFactory, start_llproxy: Callable[..., Awaitable[Any]], tmp_path: Path
) -> None:
    upstream = await start_upstream(model_ids=["m"])
    port_a, port_b = free_port_block(1), free_port_block(1)
    for name, other in (("a", port_b), ("b", port_a)):
        config = {
            "interval": 1000,
            "timeouts": {"scan": 1},
            "endpoints": [upstream.endpoint(), {"url": f"http://127.0.0.1:{other}/v1"}],
        }
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
    first = await start_llproxy("--config", str(tmp_path / "a.json"), "--workers", "1", port=port_a)
    await start_llproxy("--config", str(tmp_path / "b.json"), "--workers", "1", port=port_b)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}

    def through_both() -> bool:
        return any(
            len(via_hops(r.headers.get("Via", ""))) == 2 for r in upstream.fake.generation_requests
        )

    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 20
        while not through_both():  # until a has found b and sent it a request
            assert time.monotonic() < deadline, "a never routed through b"
            async with session.post(f"{first.url}/v1/chat/completions", json=body) as resp:
                await resp.read()
            await asyncio.sleep(0.2)
        statuses = []
        for _ in range(20):
            async with session.post(f"{first.url}/v1/chat/completions", json=body) as resp:
                await resp.read()
                statuses.append(resp.status)
        assert statuses == [200] * 20

        await upstream.server.close()  # the one real server goes: neither keeps its model
        deadline = time.monotonic() + 15
        while True:
            listings = []
            for port in (port_a, port_b):
                async with session.get(f"http://127.0.0.1:{port}/v1/models") as resp:
                    listings.append([m["id"] for m in (await resp.json())["data"]])
            if listings == [[], []]:
                break
            assert time.monotonic() < deadline, f"still listed: {listings}"
            await asyncio.sleep(0.3)


@pytest.mark.parametrize("reexport", [False, True])
async def test_models_seen_only_through_an_llproxy_are_listed_to_llproxies_on_request(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory, reexport: bool
) -> None:
    upstream = await start_upstream(model_ids=["deep"])
    node = await start_proxy([upstream.endpoint()], instance="node")
    middle = await start_proxy(
        [{"url": f"{node.url}/v1"}], instance="middle", discovery={"reexport": reexport}
    )
    [replica] = middle.state.registry.models["deep"].replicas
    assert replica.instance == "node"

    async def listed(via: str | None) -> list[str]:
        headers = {"Via": via} if via else {}
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{middle.url}/v1/models", headers=headers) as resp,
        ):
            return [m["id"] for m in (await resp.json())["data"]]

    assert await listed(None) == ["deep"]  # a client (or a proxy that is no llproxy)
    assert await listed("1.1 nginx") == ["deep"]
    assert await listed("1.1 llproxy-top") == (["deep"] if reexport else [])
    assert await listed("1.1 llproxy-node") == []  # never back to where it came from
    if not reexport:
        return
    # A request that came from the only replica's llproxy is not sent back to it.
    body = {"model": "deep", "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as session:
        for via, status in (("1.1 llproxy-node", 508), ("1.1 llproxy-top", 200)):
            async with session.post(
                f"{middle.url}/v1/chat/completions", json=body, headers={"Via": via}
            ) as resp:
                assert resp.status == status
                if status == 508:  # said by middle: node was never asked
                    error = (await resp.json())["error"]
                    assert error["code"] == "loop_detected"
                    assert error["message"].startswith("every replica of 'deep'")
    assert len(upstream.fake.generation_requests) == 1


async def test_a_servers_own_aliases_name_the_same_model(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    # llama-server --alias qwen-coder,coder,other: the first is the id, all are aliases.
    served = await start_upstream(
        model_ids=["qwen-coder"], aliases=["qwen-coder", "coder", "other"]
    )
    other = await start_upstream(model_ids=["other"])  # a real model of that name wins
    proxy = await start_proxy([served.endpoint(tags=["gpu0"]), other.endpoint(tags=["gpu0"])])
    client = proxy.client()
    listed = {m.id: m.model_extra for m in (await client.models.list()).data}
    assert sorted(listed) == ["other:gpu0", "qwen-coder:gpu0"]
    assert (listed["qwen-coder:gpu0"] or {})["aliases"] == ["coder:gpu0"]
    reply = await client.chat.completions.create(
        model="coder:gpu0", messages=[{"role": "user", "content": "x"}]
    )
    assert reply.model == "coder:gpu0"
    assert served.fake.generation_requests[-1].body["model"] == "qwen-coder"
    await client.chat.completions.create(
        model="other:gpu0", messages=[{"role": "user", "content": "x"}]
    )
    assert len(served.fake.generation_requests) == 1 and other.fake.generation_requests
    # The operator's own alias of that name wins over the server's.
    endpoints = [served.endpoint(tags=["gpu0"]), other.endpoint(tags=["gpu0"])]
    aliased = await start_proxy(endpoints, aliases={"coder:gpu0": "other:gpu0"})
    await aliased.client().chat.completions.create(
        model="coder:gpu0", messages=[{"role": "user", "content": "x"}]
    )
    assert len(served.fake.generation_requests) == 1 and len(other.fake.generation_requests) == 2
