"""Counting round trips: the statements this process sends to PostgreSQL and the commands it sends to
Redis inside a `with RoundTrips()` block, for the tests and benchmarks that hold a piece of work to a
number of round trips rather than to a time (this machine's timings are noisy; counts are not)."""

from __future__ import annotations

import threading
from typing import Any

from redis.connection import AbstractConnection as Connection
from sqlalchemy import event
from sqlalchemy.engine import Engine


class RoundTrips:
    """Statements (every engine in this process) and Redis commands (every redis-py connection in this
    process, kombu's included) made by this thread while the block runs."""

    _local = threading.local()

    def __init__(self) -> None:
        self.statements = 0
        self.broker = 0

    def __enter__(self) -> RoundTrips:
        _install()
        RoundTrips._local.active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        RoundTrips._local.active = None

    @classmethod
    def _current(cls) -> RoundTrips | None:
        return getattr(cls._local, "active", None)


_installed = False
_lock = threading.Lock()


def _install() -> None:
    global _installed
    with _lock:
        if _installed:
            return

        @event.listens_for(Engine, "before_cursor_execute")
        def _statement(*_args: Any, **_kwargs: Any) -> None:
            counter = RoundTrips._current()
            if counter is not None:
                counter.statements += 1

        send = Connection.send_packed_command

        def counted(self: Connection, command: Any, check_health: bool = True) -> None:
            counter = RoundTrips._current()
            if counter is not None:
                counter.broker += 1
            send(self, command, check_health)

        Connection.send_packed_command = counted  # type: ignore[method-assign]
        _installed = True
