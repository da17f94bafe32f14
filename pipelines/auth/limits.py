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


def hit(client: redis.Redis, bucket: str, caller: str, limit: int, window: int = 60) -> Verdict:
    """Count one request of CALLER against BUCKET's LIMIT per WINDOW seconds."""
    now = time.time()
    start = int(now // window) * window
    key = f"ingot:ratelimit:{bucket}:{caller}:{start}"
    with client.pipeline() as pipe:
        pipe.incr(key)
        pipe.expire(key, window + 5)
        count, _ = pipe.execute()
    return Verdict(count <= limit, limit, max(limit - count, 0), start + window)
