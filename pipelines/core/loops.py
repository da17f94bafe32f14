"""What belongs to one asyncio event loop (connections are bound to the loop that opened them): one of
each per running loop, made on first use there. A server has one loop; tests may run several."""

from __future__ import annotations

import asyncio
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

    def pop(self) -> T | None:
        """The running loop's own, forgotten (its loop is closing it)."""
        return self._made.pop(asyncio.get_running_loop(), None)
