"""The raw bytes of answers the SDKs receive, so a stream validator can judge each one.

A transport that passes everything through and keeps each response body as it came over
the wire; an SDK built with it behaves exactly as it would without it. The `openai` and
`anthropic` SDKs are built on `httpx2`, the `ollama` client on `httpx`: both have the
same transport interface, so `Wire.transport(lib)` makes one for either.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any


@dataclass
class Exchange:
    method: str
    path: str
    status: int
    body: bytes = b""
    complete: bool = False  # the body was read to its end


@dataclass
class Wire:
    exchanges: list[Exchange] = field(default_factory=list)

    @property
    def last(self) -> Exchange:
        return self.exchanges[-1]

    def transport(self, lib: ModuleType) -> Any:
        wire = self

        class Recorded(lib.AsyncByteStream):  # type: ignore[name-defined,misc]
            def __init__(self, response: Any, exchange: Exchange) -> None:
                self.response = response
                self.exchange = exchange

            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in self.response.stream:
                    self.exchange.body += chunk
                    yield chunk
                self.exchange.complete = True

            async def aclose(self) -> None:
                await self.response.aclose()

        class Recording(lib.AsyncBaseTransport):  # type: ignore[name-defined,misc]
            def __init__(self) -> None:
                self.inner = lib.AsyncHTTPTransport()

            async def handle_async_request(self, request: Any) -> Any:
                response = await self.inner.handle_async_request(request)
                exchange = Exchange(request.method, request.url.path, response.status_code)
                wire.exchanges.append(exchange)
                return lib.Response(
                    response.status_code,
                    headers=response.headers,
                    stream=Recorded(response, exchange),
                    extensions=response.extensions,
                )

            async def aclose(self) -> None:
                await self.inner.aclose()

        return Recording()
