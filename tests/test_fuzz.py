"""Property-based fuzzing of what parses client input: whatever a client sends, llproxy
answers 2xx or a 4xx in the client's shape, never a 5xx of its own, and the parsers
below it refuse only with their own errors."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llproxy.config import parse_config
from llproxy.core.errors import InvalidRequest
from llproxy.core.multipart import FormBody
from llproxy.gateway.hardening import host_name
from llproxy.server.app import serve_alone

from .fake_upstream import FakeUpstream

PATHS = ["chat/completions", "completions", "embeddings", "audio/transcriptions", "rerank"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Bodies that get past JSON parsing and reach the validators: the fields they look at.
request_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["fake-model", "nope", ""]) | json_values,
        "messages": st.lists(
            st.fixed_dictionaries({}, optional={"role": json_values, "content": json_values})
            | json_values,
            max_size=3,
        )
        | json_values,
        "prompt": json_values,
        "input": json_values,
        "stream": st.booleans() | json_values,
        "stream_options": json_values,
        "temperature": json_values,
        "max_tokens": json_values,
        "max_completion_tokens": json_values,
    },
)


class Servers:
    """A fake upstream and the llproxy app, on a loop of their own in a thread, so plain
    synchronous hypothesis tests can send to them."""

    def __init__(self, state: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.state = state
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.runners: list[web.AppRunner] = []

    def _run(self) -> None:
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        upstream = web.AppRunner(FakeUpstream().app())
        await upstream.setup()
        site = web.TCPSite(upstream, "127.0.0.1", 0)
        await site.start()
        upstream_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        config = parse_config(
            {
                "endpoints": [{"hostname": "127.0.0.1", "port_start": upstream_port}],
                "state_dir": str(self.state),
                "rate_limit": None,
            }
        )
        proxy = web.AppRunner(serve_alone(config))
        await proxy.setup()
        proxy_site = web.TCPSite(proxy, "127.0.0.1", 0)
        await proxy_site.start()
        self.port = proxy_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.runners = [proxy, upstream]

    def stop(self) -> None:
        async def cleanup() -> None:
            for runner in self.runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(
                "POST", f"/v1/{path}", body=body, headers={"Content-Type": content_type}
            )
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    running = Servers(tmp_path_factory.mktemp("fuzz-state"))
    running.thread.start()
    assert running.ready.wait(30)
    yield running
    running.stop()


def assert_client_shaped(status: int, raw: bytes) -> None:
    assert status < 500, (status, raw[:300])
    if status >= 400:
        error = orjson.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"}, raw[:300]


fuzz = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@fuzz
@given(path=st.sampled_from(PATHS), body=request_bodies)
def test_any_json_body_is_answered_in_the_client_shape(
    servers: Servers, path: str, body: dict[str, Any]
) -> None:
    status, raw = servers.post(path, json.dumps(body).encode(), "application/json")
    assert_client_shaped(status, raw)


@fuzz
@given(path=st.sampled_from(PATHS), raw=st.binary(max_size=300), as_json=st.booleans())
def test_any_bytes_are_answered_in_the_client_shape(
    servers: Servers, path: str, raw: bytes, as_json: bool
) -> None:
    content_type = "application/json" if as_json else "multipart/form-data; boundary=b"
    status, answer = servers.post(path, raw, content_type)
    assert_client_shaped(status, answer)


form_parts = st.lists(
    st.tuples(st.sampled_from(["model", "file", "x", 'a"b']), st.binary(max_size=40)),
    max_size=4,
)


@fuzz
@given(parts=form_parts, tail=st.binary(max_size=20), boundary=st.sampled_from(["b", "xyz"]))
def test_any_form_is_parsed_or_refused_as_invalid(
    parts: list[tuple[str, bytes]], tail: bytes, boundary: str
) -> None:
    raw = (
        b"".join(
            b"--"
            + boundary.encode()
            + b'\r\nContent-Disposition: form-data; name="'
            + name.encode()
            + b'"\r\n\r\n'
            + value
            + b"\r\n"
            for name, value in parts
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
        + tail
    )
    try:
        form = FormBody(raw, f"multipart/form-data; boundary={boundary}")
        form.field("model")
        rebuilt = FormBody(
            form.with_field("model", "m"), f"multipart/form-data; boundary={boundary}"
        )
    except InvalidRequest:
        return
    assert rebuilt.field("model") == "m"


@fuzz
@given(st.text(max_size=60))
def test_any_host_header_parses_or_is_refused(header: str) -> None:
    name = host_name(header)
    assert name is None or (name == name.lower() and " " not in name and "@" not in name)
