"""The connection's deadline: a request's headers arrive within `INGOT_API_REQUEST_TIMEOUT_SECONDS` of
the connection opening, or of the request's first byte on a kept-alive connection, or the connection
is closed; and they come to at most MAX_HEADER_BYTES, or the answer is 431.

uvicorn times nothing before a request is whole: its keep-alive timeout is armed only after a
response, and every byte received disarms it. A client that opens connections and sends nothing, or
trickles a request line and its headers a byte at a time (Slowloris), holds each connection as long
as it likes, and enough of them take every file descriptor the API has. Once the headers are in, the
request belongs to the app: a body that trickles is waited for inside the request's own deadline
(`api.deadline`), and an answer streams for as long as it takes.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.metrics import HEADERS_TIMED_OUT
from pipelines.core.settings import get_settings

# What a request's line and headers may come to. httptools sets no limit and holds a header whole
# before handing it on (an 8 MB header was answered 200), so the bytes are counted as they arrive:
# with up to 256 KiB in one read, headers under 768 KiB are never refused.
MAX_HEADER_BYTES = 1 << 20
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
              b"connection: close\r\ncontent-length: 34\r\n\r\nthe request's headers are too long")


class HeadersDeadline(HttpToolsProtocol):
    _headers_due: asyncio.TimerHandle | None = None
    _header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_the_clock()

    def data_received(self, data: bytes) -> None:
        if self._headers_due is not None:  # this request's headers are still coming
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._stop_the_clock()
                self.transport.write(_TOO_LARGE)
                self.transport.close()
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_the_clock()  # a kept-alive connection's next request: its own clock

    def on_headers_complete(self) -> None:
        self._stop_the_clock()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_the_clock()
        super().connection_lost(exc)

    def _start_the_clock(self) -> None:
        if self._headers_due is None:  # a new connection's first request keeps the clock it opened with
            self._headers_due = self.loop.call_later(get_settings().api_request_timeout_seconds, self._too_slow)

    def _stop_the_clock(self) -> None:
        self._header_bytes = 0
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def _too_slow(self) -> None:
        self._headers_due = None
        if not self.transport.is_closing():
            HEADERS_TIMED_OUT.inc()
            self.transport.close()
