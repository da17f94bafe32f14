"""Rate limiting as the API applies it: who a request counts against, and the figures it is told.

The default limit is counted where the caller is identified (`api.deps.principal`, one step for
both); tighter limits per route are `api.deps.limit(...)`.
"""

from __future__ import annotations

import time

import redis
from fastapi import Request

from api.envelope import ApiError
from pipelines.auth import limits
from pipelines.core import runtime
from pipelines.core.models import ApiKey
from worker.dispatch import broker_redis


def address(request: Request) -> str:
    return "ip:" + (request.client.host if request.client else "unknown")


def caller(request: Request, key: ApiKey | None) -> str:
    """The authenticated principal, whatever header or spelling carried its credentials; else (none
    given, or not valid) the client address alone, so invented keys share one bucket."""
    return f"principal:{key.id}" if key is not None else address(request)


def count(request: Request, bucket: str, who: str, limit: int) -> None:
    """Count one request of WHO against BUCKET's LIMIT a minute; 429 past it."""
    try:
        verdict = limits.hit(broker_redis(), bucket, who, limit)
    except redis.RedisError:
        return  # a limiter that cannot count lets requests through rather than taking the API down
    # The tightest limit on the route is the one reported, on the answer whatever it is (see api.access).
    shown = getattr(request.state, "rate_limit_headers", None)
    if shown is None or int(shown["X-RateLimit-Remaining"]) > verdict.remaining:
        request.state.rate_limit_headers = verdict.headers()
    if not verdict.allowed:
        retry = max(1, verdict.reset - int(time.time()))
        raise ApiError(429, f"rate limit of {limit} requests per minute exceeded; retry in {retry} s",
                       headers={**verdict.headers(), "Retry-After": str(retry)})


def count_default(request: Request, key: ApiKey | None) -> None:
    own = key.rate_limit_per_minute if key is not None else None  # a key's tier, set at its creation
    count(request, "default", caller(request, key), own or runtime.value("rate_limit_per_minute"))


def address_headers(request: Request) -> dict[str, str]:
    """The default limit's figures for a request that matched no route (no dependency ran), counted
    against its address."""
    try:
        verdict = limits.hit(broker_redis(), "default", address(request), runtime.value("rate_limit_per_minute"))
    except redis.RedisError:
        return {}
    return verdict.headers()
