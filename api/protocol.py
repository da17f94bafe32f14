"""The connection's deadline: a request's headers arrive within `INGOT_API_REQUEST_TIMEOUT_SECONDS` of
the connection opening, or of the request's first byte on a kept-alive connection, or the connection
is closed.

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


class HeadersDeadline(HttpToolsProtocol):
    _headers_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_the_clock()

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
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def _too_slow(self) -> None:
        self._headers_due = None
        if not self.transport.is_closing():
            HEADERS_TIMED_OUT.inc()
            self.transport.close()
