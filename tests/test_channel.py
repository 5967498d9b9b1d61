"""The supervisor-worker channel: messages of any size, both ways at once, none lost."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from llproxy.core.usage import UsageRecord
from llproxy.process.channel import Channel, MetricsReply, UsageBatch

BIG = 5 * 1024 * 1024  # far over what one read of a socket returns


async def test_large_messages_both_ways_at_once() -> None:
    left_sock, right_sock = socket.socketpair()
    got: dict[str, list[Any]] = {"left": [], "right": []}
    closed = asyncio.Event()
    left = Channel(left_sock, got["left"].append)
    right = Channel(right_sock, got["right"].append, closed.set)
    await left.attach()
    await right.attach()
    # Both send large messages before either reads: no deadlock, nothing cut.
    for i in range(3):
        assert left.send(MetricsReply(i, bytes([i]) * BIG))
        assert right.send(MetricsReply(10 + i, b"r" * BIG))
    left.send(MetricsReply(99, b"last"))
    async with asyncio.timeout(30):
        while len(got["left"]) < 3 or len(got["right"]) < 4:
            await asyncio.sleep(0.01)
    assert [m.token for m in got["right"]] == [0, 1, 2, 99]
    assert all(m.body == bytes([m.token]) * BIG for m in got["right"][:3])
    assert [len(m.body) for m in got["left"]] == [BIG] * 3
    # Closing one end flushes what it had written and tells the other end.
    await left.close()
    await asyncio.wait_for(closed.wait(), 10)
    assert not right.send(MetricsReply(0, b"x"))
    await right.close()


async def test_usage_batches_arrive_as_usage_records() -> None:
    left_sock, right_sock = socket.socketpair()
    got: list[Any] = []
    left = Channel(left_sock, lambda message: None)
    right = Channel(right_sock, got.append)
    await left.attach()
    await right.attach()
    records = [
        UsageRecord(1.5, "team-a", "m:tag", "127.0.0.1:8000", 200, 7, 3, 12.5),
        UsageRecord(2.5, "127.0.0.1", "m:tag", None, 504, None, None, 30000.0),
    ]
    assert left.send(UsageBatch(records))
    async with asyncio.timeout(10):
        while not got:
            await asyncio.sleep(0.01)
    assert got == [UsageBatch(records)]
    assert all(type(record) is UsageRecord for record in got[0].records)
    assert got[0].records[0].completion_tokens == 3
    await left.close()
    await right.close()


async def test_a_message_its_handler_fails_on_does_not_end_the_channel() -> None:
    """The master reads each worker's channel in one task: a message that makes its
    handler raise is logged and skipped, and the channel goes on serving."""
    left_sock, right_sock = socket.socketpair()
    got: list[Any] = []

    def handle(message: Any) -> None:
        if message.token == 1:
            raise RecursionError("a handler tripped over this message")
        got.append(message)

    left = Channel(left_sock, lambda message: None)
    right = Channel(right_sock, handle)
    await left.attach()
    await right.attach()
    for token in (1, 2, 3):
        assert left.send(MetricsReply(token, b""))
    async with asyncio.timeout(10):
        while len(got) < 2:
            await asyncio.sleep(0.01)
    assert [m.token for m in got] == [2, 3]
    assert right.send(MetricsReply(4, b""))  # its end is still open
    await left.close()
    await right.close()
