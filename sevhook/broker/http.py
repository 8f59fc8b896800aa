"""uvicorn's httptools protocol with the bounds it lacks, so slow, idle or greedy clients cannot hold the
broker's connections, memory or file descriptors:

- the request line and headers may take at most `max_header_bytes` (431, then the connection closes)
  and `header_timeout` seconds from their first byte (or from the connection's start) to their end;
- a request body must arrive within `body_timeout` seconds after the headers;
- an idle keep-alive connection closes after `keepalive_timeout` (uvicorn's own timer);
- at most `max_connections` connections are open; one more is answered 503 and closed at once.

httptools buffers a header until it is complete, so the header budget is counted on the raw bytes
before they reach the parser: memory stays bounded by the budget plus one read."""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sevhook.broker.settings import Limits


def _close_with(transport: asyncio.Transport, status: bytes, text: str) -> None:
    """A one-off plain answer written straight to the socket, then the connection closes."""
    body = text.encode()
    transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: "
                    + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
    transport.close()


class GuardedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol plus the deadlines and caps above; `limits` is set by `guarded_protocol`."""

    limits: Limits = Limits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = True  # a connection starts waiting for a request's headers
        self._header_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float, status: bytes, text: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire, status, text)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, status: bytes, text: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started:  # never interleave with a response
            self.transport.close()
        else:
            _close_with(self.transport, status, text)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            _close_with(transport, b"503 Service Unavailable", "too many open connections; retry later\n")
            return
        # the first request's headers are due within header_timeout of the connection (an idle socket too)
        self._arm(self.limits.header_timeout, b"408 Request Timeout", "request headers took too long\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():  # refused or timed out: what is still buffered is not parsed
            return
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._in_headers and self._header_bytes > self.limits.max_header_bytes \
                and not self.transport.is_closing():
            self._too_large()  # this read did not finish the headers and went past the budget

    def _too_large(self) -> None:
        self._disarm()
        self.parser = httptools.HttpRequestParser(self)  # drop what the old parser buffered
        _close_with(self.transport, b"431 Request Header Fields Too Large",
                    f"request line and headers exceed {self.limits.max_header_bytes} bytes\n")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a keep-alive connection's next request (the first one's runs since connect)
            self._arm(self.limits.header_timeout, b"408 Request Timeout", "request headers took too long\n")

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._arm(self.limits.body_timeout, b"408 Request Timeout", "request body took too long\n")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # uvicorn arms its keep-alive timer here; the next request's first byte arms the header deadline
        self._disarm()
        self._in_headers = True
        self._header_bytes = 0
        super().on_response_complete()


def guarded_protocol(limits: Limits) -> type[GuardedHttpProtocol]:
    """The protocol class for uvicorn.Config(http=...), bound to these limits."""
    return type("BrokerHttpProtocol", (GuardedHttpProtocol,), {"limits": limits})
