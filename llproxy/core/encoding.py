"""Compressed bodies (gzip, deflate) decoded piece by piece within bounds.

A few kilobytes of gzip can expand to gigabytes: every piece is decoded only as far as the
ratio allows, so the expansion is refused before it is held in memory. Both sides use it:
upstream answers and client request bodies.
"""

from __future__ import annotations

import zlib

# Decoded bytes a compressed body may produce before its ratio is held against it: a gzip
# header and the first deflate blocks expand more than the stream does on average.
DECODE_SLACK = 1024 * 1024


class BodyEncodingError(ValueError):
    """A compressed body that cannot be decoded."""


class UnsupportedEncoding(BodyEncodingError):
    pass


class BodyTooLarge(BodyEncodingError):
    """Decoding would cross a bound: the body's size or the compression ratio."""


class BoundedDecoder:
    """gzip or deflate decoded read by read, never past `ratio` decoded bytes per byte
    received."""

    def __init__(self, encoding: str, ratio: int) -> None:
        encoding = encoding.strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._zlib = zlib.decompressobj()
        else:
            raise UnsupportedEncoding(f"unsupported content-encoding {encoding!r}")
        self.ratio = ratio
        self.received = 0
        self.produced = 0

    def decode(self, data: bytes) -> bytes:
        self.received += len(data)
        allowed = self.ratio * self.received + DECODE_SLACK - self.produced
        try:
            out = self._zlib.decompress(data, allowed + 1)
        except zlib.error as exc:
            raise BodyEncodingError(f"bad compressed body: {exc}") from None
        if len(out) > allowed or self._zlib.unconsumed_tail:
            raise BodyTooLarge(
                f"compressed body expands more than {self.ratio} times (a compression bomb?)"
            )
        self.produced += len(out)
        return out

    def flush(self) -> bytes:
        try:
            return self._zlib.flush()
        except zlib.error as exc:
            raise BodyEncodingError(f"bad compressed body: {exc}") from None


def decode_body(data: bytes, encoding: str | None, limit: int, ratio: int) -> bytes:
    """A whole body in its content-encoding, decoded to at most `limit` bytes."""
    if encoding is None or encoding.strip().lower() in ("", "identity"):
        return data
    decoder = BoundedDecoder(encoding, ratio)
    body = decoder.decode(data) + decoder.flush()
    if len(body) > limit:
        raise BodyTooLarge(f"body larger than {limit} bytes")
    return body
