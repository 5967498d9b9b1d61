"""A library a worker imports only when a feature first needs it, missing or broken: the
master stops before it listens, naming it (process/preflight.py), instead of serving and
failing each request that needs it with a 500."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from llproxy.process.supervisor import EX_BOOT_FAILURE

from .process import LlproxyProcess

Start = Callable[..., Awaitable[LlproxyProcess]]


# rich: the message itself then goes through logging's own error report (ui/logs.py).
@pytest.mark.parametrize("library", ["re2", "json_repair", "rich"])
async def test_a_broken_feature_library_stops_the_start_before_any_socket(
    start_llproxy: Start, tmp_path: Path, library: str
) -> None:
    shadow = tmp_path / "shadow" / library
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(f"raise ImportError('{library} is broken here')\n")
    config = tmp_path / "llproxy.json"
    # A replica marked `redact`: its prompts go through RE2.
    endpoint = {"url": "http://127.0.0.1:9/v1", "redact": True}
    config.write_text(json.dumps({"state_dir": str(tmp_path), "endpoints": [endpoint]}))
    path = os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])
    daemon = await start_llproxy(
        "--config", str(config), "--workers", "1", ready=False, env={"PYTHONPATH": path}
    )
    assert await daemon.wait_exit(timeout=30) == EX_BOOT_FAILURE, daemon.output
    assert f"{library} is broken here" in daemon.output
    assert "cannot start" in daemon.output
    assert "serving on" not in daemon.output
