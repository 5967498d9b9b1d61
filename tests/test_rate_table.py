"""The host's rate table in shared memory: moving windows that never allow more than the
limit, reused slots, and the overflow counter for what the table cannot hold; exact
across real processes."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import pytest

from llproxy.core.ratelimit import Verdict, parse_limit
from llproxy.stores import HostShare
from llproxy.stores.memory import SLOT_BYTES, DequeWindows, HostCounter, WindowTable


def small_table(slots: int) -> WindowTable:
    share = HostShare.private()
    return WindowTable(share.memory, share.lock, slots=slots)


def test_a_window_allows_exactly_its_amount_and_slides() -> None:
    table = small_table(8)
    verdicts = [table.hit(3, 1.0, "ip:a") for _ in range(5)]
    assert [v.allowed for v in verdicts if v] == [True, True, True, False, False]
    assert [v.remaining for v in verdicts if v] == [2, 1, 0, 0, 0]
    refused = verdicts[-1]
    assert refused is not None and 0 < refused.reset_after <= 1.0
    # Another client, or another limit of the same client, has its own window.
    other = table.hit(3, 1.0, "ip:b")
    assert other is not None and other.allowed
    assert (bigger := table.hit(4, 1.0, "ip:a")) is not None and bigger.allowed
    time.sleep(1.05)  # the window has moved past the first three hits
    again = table.hit(3, 1.0, "ip:a")
    assert again is not None and again.allowed and again.remaining == 2


def test_a_large_limit_stays_in_the_table_and_exact() -> None:
    table = small_table(2)
    verdicts = [table.hit(2000, 60.0, "key:busy") for _ in range(2005)]
    assert all(v is not None for v in verdicts)
    assert sum(v.allowed for v in verdicts if v) == 2000
    last = verdicts[-1]
    assert last is not None and last.remaining == 0 and 59 < last.reset_after <= 61


def test_what_the_table_cannot_hold_overflows() -> None:
    table = small_table(4)
    held = [table.hit(5, 60.0, f"ip:{n}") for n in range(4)]
    assert all(v is not None and v.allowed for v in held)
    assert table.hit(5, 60.0, "ip:full") is None  # every slot is inside its window
    # A slot whose hits all left their window is reused.
    short = small_table(1)
    assert short.hit(5, 0.05, "ip:x") is not None
    time.sleep(0.15)
    reused = short.hit(5, 60.0, "ip:y")
    assert reused is not None and reused.allowed and reused.remaining == 4


async def test_the_host_counter_passes_overflow_on_and_stays_exact() -> None:
    asked: list[tuple[str, str]] = []
    windows = DequeWindows()

    async def overflow(limit: str, client: str) -> Verdict:
        asked.append((limit, client))
        return await windows.hit(limit, client)

    counter = HostCounter(small_table(1), overflow)
    assert (await counter.hit("3 per minute", "ip:first")).allowed  # takes the one slot
    verdicts = [await counter.hit("3 per minute", "ip:second") for _ in range(5)]
    assert [v.allowed for v in verdicts] == [True, True, True, False, False]
    assert asked == [("3 per minute", "ip:second")] * 5
    assert len([await counter.hit("3 per minute", "ip:first") for _ in range(2)]) == 2
    assert len(asked) == 5  # the client in the table stays there


def _hammer(memory: Any, lock: Any, results: Any, rounds: int) -> None:
    table = WindowTable(memory, lock, slots=16)
    limit = parse_limit("500 per minute")
    allowed = sum(
        1
        for _ in range(rounds)
        if (verdict := table.hit(limit.amount, limit.seconds, "key:shared")) and verdict.allowed
    )
    results.put(allowed)


@pytest.mark.timeout(120)
def test_processes_sharing_the_table_count_exactly() -> None:
    """Four processes hit one client's window 300 times each: exactly 500 pass."""
    context = multiprocessing.get_context("spawn")
    memory = context.RawArray("B", 16 * SLOT_BYTES)
    lock = context.Lock()
    results = context.Queue()
    workers = [context.Process(target=_hammer, args=(memory, lock, results, 300)) for _ in range(4)]
    for worker in workers:
        worker.start()
    allowed = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert sum(allowed) == 500
