"""Rate limits kept in Redis: a token bucket per caller and limit, shared by every API process.

A bucket holds up to its burst and refills at its rate, continuously: a client may send a burst at
once, then as fast as the rate allows; no window boundary lets it send twice its allowance.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

from pipelines.core import runtime
from pipelines.core.settings import get_settings


@dataclass
class Verdict:
    allowed: bool
    limit: int  # requests a minute
    remaining: int  # requests that may be made at once now
    reset: int  # epoch seconds when the bucket is full again
    retry_after: int = 0  # seconds until the next request may be made, when this one was refused

    def headers(self) -> dict[str, str]:
        return {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
                "X-RateLimit-Reset": str(self.reset)}


@dataclass(frozen=True)
class Rate:
    """A token bucket's shape: refilled at PER_MINUTE tokens a minute, holding BURST at most."""

    per_minute: int
    burst: int

    @classmethod
    def parse(cls, text: str) -> Rate:
        """`1000/200`: 1000 a minute, 200 at once (`1000` alone: a burst of a minute's worth)."""
        rate, _, burst = text.strip().partition("/")
        parsed = cls(int(rate), int(burst or rate))
        if parsed.per_minute < 1 or parsed.burst < 1:
            raise ValueError(f"a rate must be at least 1/1, not {text!r}")
        return parsed


UNLIMITED = Rate(10_000_000, 10_000_000)  # counted (its figures are shown) but never reached


@functools.lru_cache(maxsize=8)
def tiers(basic_per_minute: int, basic_burst: int | None, others: str) -> dict[str, Rate]:
    """The tiers a key may have: `basic` (BASIC_PER_MINUTE, a burst of BASIC_BURST or a minute's
    worth), `unlimited`, and OTHERS (`name=rate/burst,...`, as INGOT_RATE_LIMIT_TIERS says)."""
    named = {"basic": Rate(basic_per_minute, basic_burst or basic_per_minute), "unlimited": UNLIMITED}
    for entry in filter(None, (e.strip() for e in others.split(","))):
        name, _, rate = entry.partition("=")
        named[name.strip()] = Rate.parse(rate)
    return named


def configured() -> dict[str, Rate]:
    """The tiers as they are now, for every process: `basic` at the runtime rate (an admin may change it
    live: PUT /config) with `INGOT_RATE_LIMIT_BURST`, and those `INGOT_RATE_LIMIT_TIERS` names."""
    settings = get_settings()
    return tiers(runtime.current("rate_limit_per_minute"), settings.rate_limit_burst, settings.rate_limit_tiers)

# Take one token from a bucket, refilled by the time elapsed on Redis's own clock (every API process
# agrees on it): one round trip, atomic. Replies [allowed, tokens left, now], numbers as text.
_TAKE = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(held[1]) or burst
local at = tonumber(held[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then
    tokens = tokens - 1
    allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(tokens), tostring(now)}
"""
_TAKE_SHA = hashlib.sha1(_TAKE.encode()).hexdigest()  # noqa: S324  (Redis names scripts by their SHA-1)


def with_scripts(commands: list[tuple]) -> list[tuple]:
    """COMMANDS with each script sent whole (EVAL), for a Redis that does not know it yet (NOSCRIPT:
    restarted, or flushed); once run, it is known by its SHA-1 again."""
    return [("EVAL", _TAKE, *command[2:]) if command[:2] == ("EVALSHA", _TAKE_SHA) else command
            for command in commands]


@dataclass(frozen=True)
class Bucket:
    """One caller's token bucket for one limit, shared by every API process."""

    key: str
    rate: Rate

    @classmethod
    def of(cls, bucket: str, caller: str, rate: Rate) -> Bucket:
        return cls(f"ingot:ratelimit:{bucket}:{caller}", rate)

    def commands(self) -> list[tuple]:
        """The Redis command that takes one token: one reply. The script goes by its SHA-1 (a NOSCRIPT
        answer: send `with_scripts(...)` instead)."""
        return [("EVALSHA", _TAKE_SHA, 1, self.key, self.rate.per_minute / 60, self.rate.burst)]

    def verdict(self, reply: list) -> Verdict:
        allowed, tokens, now = int(reply[0]), float(reply[1]), float(reply[2])
        per_second = self.rate.per_minute / 60
        full = now + (self.rate.burst - tokens) / per_second
        wait = 0 if allowed else max(1, math.ceil((1 - tokens) / per_second))
        return Verdict(bool(allowed), self.rate.per_minute, int(tokens), math.ceil(full), wait)


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
        # To the microsecond: kept in whole seconds, a failure late in one second and a try early in the
        # next were a second apart by the record, and the first 1 s wait was no wait at all.
        return [("HINCRBY", self.key, "count", 1), ("HSET", self.key, "last", f"{now:.6f}"),
                ("EXPIRE", self.key, FORGET_AFTER)]

    def succeeded(self) -> list[tuple]:
        return [("DEL", self.key)]

    @staticmethod
    def wait_left(reply: list, now: float) -> int:
        """Seconds until the account may try again, from READ's reply (0: now)."""
        count = int(reply[0]) if reply[0] is not None else 0
        last = float(reply[1]) if reply[1] is not None else 0.0
        return max(0, math.ceil(last + login_delay(count) - now)) if count else 0
