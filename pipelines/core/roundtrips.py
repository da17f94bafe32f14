"""Counting round trips: the statements this process sends to PostgreSQL and the commands it sends to
Redis inside a `with RoundTrips()` block, for the tests and benchmarks that hold a piece of work to a
number of round trips rather than to a time (this machine's timings are noisy; counts are not)."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
from redis.connection import AbstractConnection as Connection


class RoundTrips:
    """Statements (every psycopg connection in this process: SQLAlchemy's statements, and those sent
    on its driver, `pipelines.core.db.Prepared`'s and COPYs) and Redis commands (every redis-py
    connection in this process, kombu's included) made by this thread while the block runs."""

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

        def counting(method: Any) -> Any:
            def wrapper(self: psycopg.Cursor, *args: Any, **kwargs: Any) -> Any:
                counter = RoundTrips._current()
                if counter is not None:
                    counter.statements += 1
                return method(self, *args, **kwargs)
            return wrapper

        for name in ("execute", "executemany", "copy"):
            setattr(psycopg.Cursor, name, counting(getattr(psycopg.Cursor, name)))

        send = Connection.send_packed_command

        def counted(self: Connection, command: Any, check_health: bool = True) -> None:
            counter = RoundTrips._current()
            if counter is not None:
                counter.broker += 1
            send(self, command, check_health)

        Connection.send_packed_command = counted  # type: ignore[method-assign]
        _installed = True
