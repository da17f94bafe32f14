"""Rate-limit dependencies: the default limit on every /api/v1 route, and tighter ones per route."""

from __future__ import annotations

import hashlib
import time

import redis
from fastapi import Depends, Request, Response

from api.envelope import ApiError
from pipelines.auth import limits
from pipelines.core import runtime
from worker.dispatch import broker_redis


def _caller(request: Request) -> str:
    """The API key (hashed: never a secret in a Redis key) or, unauthenticated, the client address."""
    key = request.headers.get("x-api-key") or request.headers.get("authorization", "")
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]
    return "ip:" + (request.client.host if request.client else "unknown")


def _apply(request: Request, response: Response, bucket: str, limit: int) -> None:
    try:
        verdict = limits.hit(broker_redis(), bucket, _caller(request), limit)
    except redis.RedisError:
        return  # a limiter that cannot count lets requests through rather than taking the API down
    if not verdict.allowed:
        retry = max(1, verdict.reset - int(time.time()))
        raise ApiError(429, f"rate limit of {limit} requests per minute exceeded; retry in {retry} s",
                       headers={**verdict.headers(), "Retry-After": str(retry)})
    # The tightest limit on the route is the one reported.
    current = response.headers.get("X-RateLimit-Remaining")
    if current is None or int(current) > verdict.remaining:
        response.headers.update(verdict.headers())


def default_limit(request: Request, response: Response) -> None:
    _apply(request, response, "default", runtime.value("rate_limit_per_minute"))


def limit(bucket: str, per_minute):
    """A dependency limiting a route to PER_MINUTE() requests a minute per caller."""

    def check(request: Request, response: Response) -> None:
        _apply(request, response, bucket, per_minute())

    return Depends(check)
