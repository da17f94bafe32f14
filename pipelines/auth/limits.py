"""Rate limits kept in Redis: a fixed window per caller and bucket, shared by every API process."""

from __future__ import annotations

import hashlib
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


# --- logging in: a growing delay per account after failures -------------------------------------

FREE_FAILURES = 5  # failed logins in a row an account may have without waiting
MOST_DELAY = 15 * 60
FORGET_AFTER = 24 * 3600  # failures older than this (since the latest) are forgotten


def login_delay(failures: int) -> int:
    """Seconds an account waits after its latest failure before it may try again: none for the first
    FREE_FAILURES failures in a row, then 1, 2, 4, ... up to MOST_DELAY."""
    if failures < FREE_FAILURES:
        return 0
    return min(2 ** min(failures - FREE_FAILURES, 20), MOST_DELAY)


@dataclass(frozen=True)
class Account:
    """The failed logins of one username (whatever its letter case), shared by every API process and
    counted whatever address they come from."""

    key: str

    @classmethod
    def named(cls, username: str) -> Account:
        digest = hashlib.sha256(username.strip().lower().encode()).hexdigest()[:32]
        return cls(f"ingot:login:failures:{digest}")

    def read(self) -> tuple:
        return ("HMGET", self.key, "count", "last")

    def failed(self, now: float) -> list[tuple]:
        return [("HINCRBY", self.key, "count", 1), ("HSET", self.key, "last", int(now)),
                ("EXPIRE", self.key, FORGET_AFTER)]

    def succeeded(self) -> list[tuple]:
        return [("DEL", self.key)]

    @staticmethod
    def wait_left(reply: list, now: float) -> int:
        """Seconds until the account may try again, from READ's reply (0: now)."""
        count, last = (int(v) if v is not None else 0 for v in reply)
        return max(0, last + login_delay(count) - int(now)) if count else 0
