"""Rate limits kept in Redis: a fixed window per caller and bucket, shared by every API process."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis


@dataclass
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset: int  # epoch seconds when the window ends

    def headers(self) -> dict[str, str]:
        return {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
                "X-RateLimit-Reset": str(self.reset)}


@dataclass(frozen=True)
class Window:
    """The counter of one caller in one bucket for the current window."""

    key: str
    start: int
    seconds: int

    @classmethod
    def now(cls, bucket: str, caller: str, seconds: int = 60) -> Window:
        start = int(time.time() // seconds) * seconds
        return cls(f"ingot:ratelimit:{bucket}:{caller}:{start}", start, seconds)

    def commands(self) -> list[tuple]:
        """The Redis commands that count one request: two replies, the count first."""
        return [("INCR", self.key), ("EXPIRE", self.key, self.seconds + 5)]

    def verdict(self, count: int, limit: int) -> Verdict:
        return Verdict(count <= limit, limit, max(limit - count, 0), self.start + self.seconds)


def hit(client: redis.Redis, bucket: str, caller: str, limit: int, window: int = 60) -> Verdict:
    """Count one request of CALLER against BUCKET's LIMIT per WINDOW seconds."""
    counter = Window.now(bucket, caller, window)
    with client.pipeline(transaction=False) as pipe:
        for command in counter.commands():
            pipe.execute_command(*command)
        count, _ = pipe.execute()
    return counter.verdict(count, limit)
