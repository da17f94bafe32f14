"""Polling a condition with a deadline, instead of sleeping."""

from __future__ import annotations

import time


def wait_for(condition, timeout: float = 30, interval: float = 0.1, message: str = "condition"):
    """Poll CONDITION until it returns something truthy; fail after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)
