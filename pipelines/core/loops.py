"""What belongs to one asyncio event loop (connections are bound to the loop that opened them): one of
each per running loop, made on first use there. A server has one loop; tests may run several. And what
belongs to one process: a helper thread, started again in a forked child."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    def __init__(self, make: Callable[[], T]) -> None:
        self.make = make
        self._made: dict[asyncio.AbstractEventLoop, T] = {}

    def get(self) -> T:
        """The running loop's own, made now if it has none (and forgetting those of closed loops)."""
        loop = asyncio.get_running_loop()
        found = self._made.get(loop)
        if found is None:
            for old in [other for other in self._made if other.is_closed()]:
                del self._made[old]
            found = self._made[loop] = self.make()
        return found

    def made(self) -> list[T]:
        """Every loop's own, as they are now (for reporting, from any thread)."""
        return [found for loop, found in list(self._made.items()) if not loop.is_closed()]

    def pop(self) -> T | None:
        """The running loop's own, forgotten (its loop is closing it)."""
        return self._made.pop(asyncio.get_running_loop(), None)


P = TypeVar("P", bound="ProcessThread")


class ProcessThread(threading.Thread):
    """A daemon thread of which each process runs one per subclass, started on first use: in a forked
    child (a worker's pool process) the parent's thread does not exist, so the child starts its own."""

    _lock = threading.Lock()
    _running: dict[type, ProcessThread] = {}

    def __init__(self) -> None:
        super().__init__(name=type(self).__name__.lower(), daemon=True)
        self.pid = os.getpid()

    @classmethod
    def of_this_process(cls: type[P]) -> P:
        with ProcessThread._lock:
            found = ProcessThread._running.get(cls)
            if found is None or found.pid != os.getpid():
                found = ProcessThread._running[cls] = cls()
                found.start()
            return found  # type: ignore[return-value]

