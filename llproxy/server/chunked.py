"""A streamed answer's chunks written straight to the client's transport in HTTP/1.1
chunked framing, once aiohttp has sent the headers: one bytes format and one
`transport.write` a chunk instead of four calls through `StreamResponse.write` and
aiohttp's `StreamWriter` (each checking compression, length, headers and callbacks that a
relayed stream never has). The writer's own byte counts and drain are kept as it keeps
them, so back-pressure and the response's length are what aiohttp's path gives.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.http_writer import StreamWriter

# aiohttp's `StreamWriter.write` default: bytes written between two drains.
DRAIN_EVERY = 0x10000


class ChunkFrames:
    """Writes a prepared chunked response's body chunks; made by `of` only when the
    response is plain (chunked, headers sent, nothing compressed or counted by hooks)."""

    __slots__ = ("transport", "writer")

    def __init__(self, writer: StreamWriter, transport: asyncio.Transport) -> None:
        self.writer = writer
        # The connection's transport, kept: it is the response's to its end (a closed one
        # says it is closing), and the writer's property read for it was a call a chunk.
        self.transport = transport

    @classmethod
    def of(cls, response: web.StreamResponse) -> ChunkFrames | None:
        # aiohttp's private members read with defaults that fall back to its own write:
        # another aiohttp version that has them no more still streams, only slower.
        writer = getattr(response, "_payload_writer", None)
        if (
            type(writer) is not StreamWriter
            or not writer.chunked
            or getattr(writer, "_headers_written", False) is not True
            or getattr(writer, "_eof", True) is not False
            or getattr(writer, "_compress", True) is not None
            or writer.length is not None
            or getattr(writer, "_on_chunk_sent", True) is not None
            or getattr(writer, "on_body_write", True) is not None
            or (transport := writer.transport) is None
        ):
            return None  # anything else goes through aiohttp's own write
        return cls(writer, transport)

    def write(self, data: bytes) -> bool:
        """Frame and send `data`; True when the caller is to `drain` before the next write
        (every DRAIN_EVERY bytes, as aiohttp's own write drains). Not a coroutine: most
        writes never wait (with the mended stream's end read as an attribute, 2 % of a
        relayed chunk's instructions, measured together)."""
        if not data:
            return False  # an empty chunk would end the body
        writer = self.writer
        transport = self.transport
        if transport.is_closing():
            raise ClientConnectionResetError("Cannot write to closing transport")
        frame = b"%x\r\n%b\r\n" % (len(data), data)
        size = len(frame)
        writer.buffer_size += size
        writer.output_size += size
        transport.write(frame)
        if writer.buffer_size > DRAIN_EVERY:
            writer.buffer_size = 0
            return True
        return False

    async def drain(self) -> None:
        await self.writer.drain()
