"""One deadline for a whole HTTP exchange, whatever the peer does.

httpcore's timeouts are per operation: a peer that sends a byte of its headers or its body every 14 s
holds a 15 s timeout open for ever. Inside `within(seconds)`, every connect, read and write this thread
makes through a `DeadlineBackend` is given no more than what is left of the block's deadline, so the
clock ends the exchange: the webhook worker's attempts (`pipelines.webhooks.delivery`) and the pages
of HTTP sources (`pipelines.ingestion.sources.http`, through `DeadlineTransport`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx

_clock = threading.local()


@contextmanager
def within(seconds: float) -> Iterator[float]:
    """Give the block SECONDS from now (and yield that deadline, on the monotonic clock)."""
    before = getattr(_clock, "deadline", None)
    deadline = _clock.deadline = time.monotonic() + seconds
    try:
        yield deadline
    finally:
        _clock.deadline = before


def _left(timeout: float | None, late: type[Exception]) -> float | None:
    at = getattr(_clock, "deadline", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise late("the deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self.inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None, timeout: float | None = None
                  ) -> httpcore.NetworkStream:
        return _DeadlineStream(self.inner.start_tls(ssl_context, server_hostname,
                                                    _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's own sockets, each operation limited to what is left of the thread's deadline."""

    def __init__(self) -> None:
        self.inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None) -> httpcore.NetworkStream:
        return _DeadlineStream(self.inner.connect_tcp(host, port, _left(timeout, httpcore.ConnectTimeout),
                                                      local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None
                            ) -> httpcore.NetworkStream:
        return _DeadlineStream(self.inner.connect_unix_socket(path, _left(timeout, httpcore.ConnectTimeout),
                                                              socket_options))

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


class DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport (its exceptions, its pool's limits) on a `DeadlineBackend`. httpx has no
    public way to choose the network backend yet (encode/httpx#3749), so the pool it made is replaced
    by one made the same way with that backend. No proxy: a client that needs one keeps httpx's own
    transport (`transport()`)."""

    def __init__(self, limits: httpx.Limits = httpx.Limits()) -> None:  # noqa: B008 (immutable)
        super().__init__(limits=limits)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=DeadlineBackend())


def transport() -> httpx.HTTPTransport | None:
    """A client's transport: a `DeadlineTransport`, or None (httpx's own, which honours them) where the
    environment names a proxy (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY): through a proxy, each read and
    write keeps httpx's own timeout and the proxy's limits apply."""
    return None if _environment_proxies() else DeadlineTransport()


def _environment_proxies() -> dict[str, str]:
    import urllib.request

    return {k: v for k, v in urllib.request.getproxies().items() if k in ("http", "https", "all") and v}
