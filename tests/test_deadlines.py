"""Deadlines checked by the worker's one ticking timer, with asyncio.timeout's semantics."""

from __future__ import annotations

import asyncio

import pytest

from llproxy.core.deadlines import Watchdog


async def test_block_past_its_deadline_raises_timeout_error() -> None:
    watchdog = Watchdog()
    try:
        with pytest.raises(TimeoutError), watchdog.deadline(0.2):
            await asyncio.sleep(30)
    finally:
        watchdog.close()


async def test_extended_deadline_lets_a_long_block_finish() -> None:
    watchdog = Watchdog()
    try:
        with watchdog.deadline(0.3) as deadline:
            for _ in range(8):  # 0.8 s in all, never 0.3 s without an extension
                await asyncio.sleep(0.1)
                deadline.extend(0.3)
        # Nothing is left pending on the task.
        await asyncio.sleep(0.3)
    finally:
        watchdog.close()


async def test_a_deadline_moved_after_it_fired_fires_again() -> None:
    # One deadline reused for every wait, as an upstream stream uses it for each chunk.
    watchdog = Watchdog()
    deadline = watchdog.deadline(0.2)
    try:
        for _ in range(2):
            deadline.extend(0.2)
            with pytest.raises(TimeoutError), deadline:
                await asyncio.sleep(30)
        deadline.extend(0.5)
        with deadline:
            await asyncio.sleep(0.1)  # within it: no timeout
    finally:
        watchdog.close()


async def test_other_cancellation_is_not_turned_into_a_timeout() -> None:
    watchdog = Watchdog()
    started = asyncio.Event()

    async def guarded() -> None:
        with watchdog.deadline(30):
            started.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(guarded())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    watchdog.close()


async def test_many_deadlines_each_fire_alone() -> None:
    watchdog = Watchdog()

    async def wait(limit: float, work: float) -> str:
        try:
            with watchdog.deadline(limit):
                await asyncio.sleep(work)
        except TimeoutError:
            return "timeout"
        return "done"

    try:
        results = await asyncio.gather(wait(0.2, 30), wait(30, 0.3), wait(0.2, 30), wait(30, 0.05))
        assert results == ["timeout", "done", "timeout", "done"]
    finally:
        watchdog.close()
