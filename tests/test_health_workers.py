"""Replica health across worker processes: each worker holds its own, /metrics merges
them, and the console's `models` asks the workers and shows each replica's state."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import openai
import pytest

from .conftest import UpstreamFactory
from .process import LlproxyProcess

Start = Callable[..., Awaitable[LlproxyProcess]]


async def test_workers_eject_on_their_own_and_the_master_shows_it(
    start_upstream: UpstreamFactory, start_llproxy: Start, tmp_path: Path
) -> None:
    upstream = await start_upstream(model_ids=["sick"])
    upstream.fake.fail_status = 500
    config = tmp_path / "c.json"
    health = {"failures": 1, "ejection": 600, "max_ejection": 600}
    config.write_text(json.dumps({"endpoints": [upstream.endpoint()], "health": health}))
    daemon = await start_llproxy("--config", str(config), "--workers", "2", terminal=True)
    await daemon.wait_for("console ready")
    client = openai.AsyncOpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0)
    async with client:
        # A fresh connection: whichever worker takes it fails once and ejects the replica.
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(
                model="sick",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"Connection": "close"},
            )
    assert failed.value.status_code == 500
    labels = f'model="sick",upstream="127.0.0.1:{upstream.port}"'
    async with aiohttp.ClientSession() as session, session.get(f"{daemon.url}/metrics") as resp:
        text = await resp.text()
    # Merged over both workers: one ejected it, the other still sends to it.
    assert f"llproxy_replica_ejections_total{{{labels}}} 1.0" in text
    assert f"llproxy_replica_ejected{{{labels}}} 1.0" in text
    mark = len(daemon.output)
    daemon.write("models\n")
    await daemon.wait_for(r"ejected in 1 of 2 workers, trial in \d+ s", after=mark)
    daemon.write("quit\n")
    assert await daemon.wait_exit() == 0
