"""scripts/fast_upstream.py as a subprocess, for tests that need load, not knobs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from .conftest import free_port_block, wait_listening

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fast_upstream.py"


@asynccontextmanager
async def fast_upstream(*args: str) -> AsyncIterator[int]:
    """The fast upstream on a free port (its model is `bench-model`); yields the port."""
    port = free_port_block(1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--port",
        str(port),
        *args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_listening(port)
        yield port
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
