"""The supervisor-worker channel: messages of any size, both ways at once, none lost."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from llproxy.channel import Channel, MetricsReply

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
