"""Replica health: a replica that fails requests in a row is ejected for a growing
back-off, then gets one trial; a 503 at once (or the next model of a chain) while every
replica is ejected; probes bring an ejected `url` endpoint back with no client's request."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest

from llproxy.backends.probe import probe
from llproxy.config import ConfigError, parse_config
from llproxy.core.health import Health
from llproxy.core.registry import Replica, Upstream

from .conftest import ProxyFactory, RunningProxy, RunningUpstream, UpstreamFactory
from .fake_anthropic import KEY, FakeAnthropic
from .test_cli import run_llproxy

HELLO = [{"role": "user", "content": "hi"}]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _replica(port: int = 9000) -> Replica:
    return Replica(Upstream(f"http://127.0.0.1:{port}/v1", "127.0.0.1", port), "m")


# --- the state machine, on a clock of its own -------------------------------------------


def test_a_replica_is_ejected_after_failures_in_a_row_and_never_before() -> None:
    health = Health(failures=3, ejection=5, max_ejection=300, clock=Clock())
    replica = _replica()
    for _ in range(2):
        granted = health.admit(replica, "m")
        assert granted is not None
        health.failed(granted)
    # A success between failures starts the count again.
    ok = health.admit(replica, "m")
    assert ok is not None
    health.succeeded(ok)
    for _ in range(2):
        granted = health.admit(replica, "m")
        assert granted is not None
        health.failed(granted)
    assert health.trial_in(replica) is None
    granted = health.admit(replica, "m")
    assert granted is not None
    health.failed(granted)
    assert health.trial_in(replica) == 5
    assert health.admit(replica, "m") is None


def test_the_back_off_doubles_with_each_failed_trial_up_to_its_cap() -> None:
    clock = Clock()
    health = Health(failures=1, ejection=5, max_ejection=30, clock=clock)
    replica = _replica()
    seconds = []
    granted = health.admit(replica, "m")
    assert granted is not None
    health.failed(granted)
    for _ in range(5):
        left = health.trial_in(replica)
        assert left is not None
        seconds.append(left)
        clock.now += left - 0.01
        assert health.admit(replica, "m") is None  # not a moment before it ends
        clock.now += 0.01
        trial = health.admit(replica, "m")
        assert trial is not None and trial.trial
        health.failed(trial)
    assert seconds == [5, 10, 20, 30, 30]


def test_one_trial_at_a_time_and_its_success_reinstates() -> None:
    clock = Clock()
    health = Health(failures=1, ejection=5, max_ejection=30, clock=clock)
    replica = _replica()
    granted = health.admit(replica, "m")
    assert granted is not None
    health.failed(granted)
    clock.now += 5
    trial = health.admit(replica, "m")
    assert trial is not None and trial.trial
    assert health.admit(replica, "m") is None  # others keep avoiding it meanwhile
    assert health.trial_in(replica) == 0
    health.succeeded(trial)
    assert health.trial_in(replica) is None
    again = health.admit(replica, "m")
    assert again is not None and not again.trial
    # Reinstated by a request, its next ejection starts from the first back-off again.
    health.failed(again)
    assert health.trial_in(replica) == 5


def test_a_trial_without_a_verdict_goes_to_the_next_request() -> None:
    clock = Clock()
    health = Health(failures=1, ejection=5, clock=clock)
    replica = _replica()
    granted = health.admit(replica, "m")
    assert granted is not None
    health.failed(granted)
    clock.now += 5
    trial = health.admit(replica, "m")
    assert trial is not None
    health.abandoned(trial)  # its client left
    assert health.trial_in(replica) == 0
    next_trial = health.admit(replica, "m")
    assert next_trial is not None and next_trial.trial


def test_a_probes_success_reinstates_but_the_next_failure_ejects_for_longer() -> None:
    clock = Clock()
    health = Health(failures=3, ejection=5, max_ejection=300, clock=clock)
    replica = _replica()
    for _ in range(3):
        granted = health.admit(replica, "m")
        assert granted is not None
        health.failed(granted)
    clock.now += 5
    due, wait = health.due([(replica, "m")])
    assert len(due) == 1 and wait is None
    assert health.admit(replica, "m") is None  # the probe is its trial
    health.succeeded(due[0], probe=True)
    granted = health.admit(replica, "m")
    assert granted is not None and not granted.trial
    # Its listing answered, yet the model may still fail: one failure is enough now.
    health.failed(granted)
    assert health.trial_in(replica) == 10


def test_failures_of_requests_sent_before_the_ejection_change_nothing() -> None:
    health = Health(failures=1, ejection=5, clock=Clock())
    replica = _replica()
    first, second = health.admit(replica, "m"), health.admit(replica, "m")
    assert first is not None and second is not None
    health.failed(first)
    health.failed(second)
    assert health.trial_in(replica) == 5


def test_an_exempt_backend_and_a_disabled_health_never_eject() -> None:
    person = Replica(Upstream("operator:h", "operator", 0), "h", backend="operator")
    health = Health(failures=1, exempt=("operator",), clock=Clock())
    off = Health(failures=1, enable=False, clock=Clock())
    for judge, replica in ((health, person), (off, _replica())):
        for _ in range(3):
            granted = judge.admit(replica, "m")
            assert granted is not None
            judge.failed(granted)
        assert judge.trial_in(replica) is None


@pytest.mark.parametrize(
    ("health", "message"),
    [
        ({"failures": 0}, "health.failures: must be > 0"),
        ({"ejection": 10, "max_ejection": 5}, "health.max_ejection: must be >= ejection"),
        ({"probe": "yes"}, "health.probe: must be a boolean"),
        ({"eject": 1}, "health.eject: unknown key"),
    ],
)
def test_a_bad_health_setting_names_its_field(health: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"health": health})


# --- a real app in front of real fake servers -------------------------------------------


async def _chat(proxy: RunningProxy, model: str = "fake-model") -> str:
    completion = await proxy.client().chat.completions.create(
        model=model,
        messages=HELLO,  # type: ignore[arg-type]
    )
    return completion.choices[0].message.content or ""


async def _metrics(proxy: RunningProxy) -> list[str]:
    text = (await proxy.state.metrics()).decode()
    return [line for line in text.splitlines() if line.startswith("llproxy_replica_")]


async def test_failures_in_a_row_eject_and_then_a_503_comes_at_once(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream()
    upstream.fake.fail_status = 500
    proxy = await start_proxy([upstream.endpoint()], health={"failures": 2, "ejection": 30})
    address = f"127.0.0.1:{upstream.port}"
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as failed:
            await _chat(proxy)
        assert failed.value.status_code == 500
    with pytest.raises(openai.InternalServerError) as ejected:
        await _chat(proxy)
    assert ejected.value.status_code == 503
    assert 0 < int(ejected.value.response.headers["Retry-After"]) <= 30
    assert "ejected" in ejected.value.message
    assert len(upstream.fake.generation_requests) == 2  # the third never reached it
    assert await _metrics(proxy) == [
        f'llproxy_replica_ejections_total{{model="fake-model",upstream="{address}"}} 1.0',
        f'llproxy_replica_ejected{{model="fake-model",upstream="{address}"}} 1.0',
    ]
    # The model stays listed: what exists is discovery's to say.
    assert [m.id async for m in proxy.client().models.list()] == ["fake-model"]


async def test_the_anthropic_client_hears_the_503_in_its_own_shape(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream.endpoint()], health={"failures": 1})
    await upstream.server.close()  # still listed; its connections are refused
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    async with claude:
        with pytest.raises(anthropic.APIStatusError) as refused:
            await claude.messages.create(model="fake-model", max_tokens=9, messages=HELLO)  # type: ignore[arg-type]
        assert refused.value.status_code == 502
        with pytest.raises(anthropic.APIStatusError) as ejected:
            await claude.messages.create(model="fake-model", max_tokens=9, messages=HELLO)  # type: ignore[arg-type]
    assert ejected.value.status_code == 503
    assert ejected.value.body["type"] == "error"  # type: ignore[index]
    assert "Retry-After" in ejected.value.response.headers


async def test_requests_avoid_an_ejected_replica_for_a_healthy_one(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    sick, well = await start_upstream(), await start_upstream()
    sick.fake.fail_status = 503
    proxy = await start_proxy([sick.endpoint(), well.endpoint()], health={"failures": 1})
    answered = 0
    for _ in range(6):
        try:
            await _chat(proxy)
            answered += 1
        except openai.InternalServerError:
            pass
    # The sick one failed once and was sent nothing more; the well one took the rest.
    assert len(sick.fake.generation_requests) == 1
    assert answered == 5 == len(well.fake.generation_requests)


async def test_after_its_back_off_one_trial_goes_and_its_success_reinstates(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy(
        [upstream.endpoint()], health={"failures": 1, "ejection": 60, "probe": False}
    )
    clock = Clock()
    proxy.state.health.clock = clock
    upstream.fake.fail_status = 502
    with pytest.raises(openai.InternalServerError):
        await _chat(proxy)
    with pytest.raises(openai.InternalServerError) as ejected:
        await _chat(proxy)
    assert ejected.value.status_code == 503
    # The server recovers and the back-off ends: the next request is its trial, held
    # until the test lets it answer; meanwhile every other request gets a 503 at once.
    upstream.fake.fail_status = None
    upstream.fake.gate = gate = asyncio.Event()
    clock.now += 60
    upstream.fake.got_request.clear()
    trial = asyncio.create_task(_chat(proxy))
    await asyncio.wait_for(upstream.fake.got_request.wait(), 10)
    with pytest.raises(openai.InternalServerError) as waiting:
        await _chat(proxy)
    assert waiting.value.status_code == 503
    assert waiting.value.response.headers["Retry-After"] == "1"
    gate.set()
    assert await asyncio.wait_for(trial, 20)
    assert await _chat(proxy) and await _chat(proxy)
    assert len(upstream.fake.generation_requests) == 4  # the failure, the trial, two more
    assert any(line.endswith(" 0.0") for line in await _metrics(proxy))


async def test_the_503_comes_before_the_first_byte_timeout_would(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    first_byte = 3.0
    upstream = await start_upstream()
    upstream.fake.hang = True  # accepts, and never answers
    proxy = await start_proxy(
        [upstream.endpoint()], timeouts={"first_byte": first_byte}, health={"failures": 1}
    )
    with pytest.raises(openai.APIStatusError) as timed_out:
        await asyncio.wait_for(_chat(proxy), 30)
    assert timed_out.value.status_code == 504
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as ejected:
        # Waiting on the server would take first_byte seconds: this does not wait on it.
        await asyncio.wait_for(_chat(proxy), first_byte - 0.5)
    assert ejected.value.status_code == 503
    assert time.monotonic() - started < first_byte
    assert len(upstream.fake.generation_requests) == 1


async def test_a_chain_falls_along_when_every_replica_of_its_entry_is_ejected(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    first = await start_upstream(model_ids=["first"])
    second = await start_upstream(model_ids=["second"])
    first.fake.fail_status = 500
    proxy = await start_proxy(
        [first.endpoint(), second.endpoint()],
        aliases={"smart": ["first", "second"]},
        health={"failures": 1},
    )
    for _ in range(3):
        raw = await proxy.client().chat.completions.with_raw_response.create(
            model="smart",
            messages=HELLO,  # type: ignore[arg-type]
        )
        assert raw.headers["x-llproxy-model"] == "second"
    # The first failed once (and fell over); ejected, it is skipped without a request.
    assert len(first.fake.generation_requests) == 1
    assert len(second.fake.generation_requests) == 3


async def test_a_clients_4xx_or_leaving_never_ejects_a_healthy_replica(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream.endpoint()], health={"failures": 1})
    upstream.fake.fail_status = 400
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            await _chat(proxy)
    upstream.fake.fail_status = None
    # Clients that leave before the first byte: the replica was not at fault.
    upstream.fake.first_byte_delay = 30
    for _ in range(3):
        upstream.fake.got_request.clear()
        upstream.fake.disconnected.clear()
        leaving = asyncio.create_task(_chat(proxy))
        await asyncio.wait_for(upstream.fake.got_request.wait(), 10)
        leaving.cancel()
        await asyncio.wait_for(upstream.fake.disconnected.wait(), 10)
    upstream.fake.first_byte_delay = 0
    assert await _chat(proxy)
    assert len(upstream.fake.generation_requests) == 7
    assert all(not line.endswith(" 1.0") for line in await _metrics(proxy))


async def test_a_probe_brings_back_a_url_endpoint_with_no_clients_request(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream()
    port = upstream.port
    # Named models: discovery never asks this server, so it stays listed while down.
    endpoint = {"url": f"http://127.0.0.1:{port}/v1", "models": ["fake-model"]}
    proxy = await start_proxy([endpoint], health={"failures": 1, "ejection": 0.2})
    await upstream.server.close()  # the server dies
    with pytest.raises(openai.APIStatusError) as refused:
        await _chat(proxy)
    assert refused.value.status_code == 502
    # While it is down its probes fail, each ejecting it again.
    for _ in range(200):
        if proxy.state.telemetry.ejections.get(("fake-model", f"127.0.0.1:{port}"), 0) >= 2:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("no failed probe ejected it again")
    back = await start_upstream(port=port)  # and comes back
    replica = proxy.state.registry.models["fake-model"].replicas[0]
    for _ in range(400):
        if proxy.state.health.trial_in(replica) is None:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the probe did not reinstate it")
    assert back.fake.listing_requests >= 1 and not back.fake.generation_requests
    assert await _chat(proxy)
    assert len(back.fake.generation_requests) == 1


async def test_scan_shows_each_replicas_state(
    start_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    up = await start_upstream(model_ids=["listed"])
    gone = await start_upstream()
    named = {"url": f"http://127.0.0.1:{gone.port}/v1", "models": ["named"]}
    await gone.server.close()
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"endpoints": [up.endpoint(), named]}))
    code, out, err = await run_llproxy("scan", "--json", "--config", str(config))
    assert code == 0, err
    states = {row["name"]: row["state"] for row in json.loads(out)}
    assert states["listed"] == "up"
    assert states["named"].startswith("down: ")


async def test_health_can_be_switched_off(
    start_upstream: UpstreamFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await start_upstream()
    upstream.fake.fail_status = 500
    proxy = await start_proxy([upstream.endpoint()], health={"enable": False, "failures": 1})
    for _ in range(3):
        with pytest.raises(openai.InternalServerError) as failed:
            await _chat(proxy)
        assert failed.value.status_code == 500
    assert len(upstream.fake.generation_requests) == 3


async def test_the_metrics_list_every_replica_in_service(
    upstream: RunningUpstream, proxy: RunningProxy
) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/metrics") as resp:
        text = await resp.text()
    assert (
        f'llproxy_replica_ejected{{model="fake-model",upstream="127.0.0.1:{upstream.port}"}} 0.0'
        in text
    )


async def test_a_probe_asks_a_cloud_dialects_own_listing_with_its_key() -> None:
    fake = FakeAnthropic()
    await fake.start()
    host, port = "127.0.0.1", int(fake.url.rsplit(":", 1)[1])
    cloud = Upstream(fake.url, host, port, apikey=KEY, dialect="anthropic")
    async with aiohttp.ClientSession() as session:
        assert await probe(session, cloud, 5) is None
        assert fake.received[-1].path.startswith("/v1/models")
        assert fake.received[-1].headers["x-api-key"] == KEY
        # A wrong key is a 401: the server is up all the same.
        wrong = Upstream(fake.url, host, port, apikey="sk-wrong", dialect="anthropic")
        assert await probe(session, wrong, 5) is None
        await fake.close()
        down = await probe(session, cloud, 5)
    assert down is not None and down
