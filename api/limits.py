"""Rate-limit dependencies: the default limit on every /api/v1 route, and tighter ones per route."""

from __future__ import annotations

import time

import redis
from fastapi import Depends, Request

from api.deps import Principal, PrincipalDep
from api.envelope import ApiError
from pipelines.auth import limits
from pipelines.core import runtime
from worker.dispatch import broker_redis


def _address(request: Request) -> str:
    return "ip:" + (request.client.host if request.client else "unknown")


def _caller(request: Request, who: Principal) -> str:
    """The authenticated principal, whatever header or spelling carried its credentials; else (none
    given, or not valid) the client address alone, so invented keys share one bucket."""
    return f"principal:{who.key.id}" if who.key is not None else _address(request)


def _apply(request: Request, bucket: str, caller: str, limit: int) -> None:
    try:
        verdict = limits.hit(broker_redis(), bucket, caller, limit)
    except redis.RedisError:
        return  # a limiter that cannot count lets requests through rather than taking the API down
    # The tightest limit on the route is the one reported, on the answer whatever it is (see api.envelope).
    shown = getattr(request.state, "rate_limit_headers", None)
    if shown is None or int(shown["X-RateLimit-Remaining"]) > verdict.remaining:
        request.state.rate_limit_headers = verdict.headers()
    if not verdict.allowed:
        retry = max(1, verdict.reset - int(time.time()))
        raise ApiError(429, f"rate limit of {limit} requests per minute exceeded; retry in {retry} s",
                       headers={**verdict.headers(), "Retry-After": str(retry)})


def default_limit(request: Request, who: PrincipalDep) -> None:
    _apply(request, "default", _caller(request, who), runtime.value("rate_limit_per_minute"))


def limit(bucket: str, per_minute, by_address: bool = False):
    """A dependency limiting a route to PER_MINUTE() requests a minute per caller (per client address
    alone with BY_ADDRESS: for logging in, where there is no principal yet)."""

    def check(request: Request, who: PrincipalDep) -> None:
        _apply(request, bucket, _address(request) if by_address else _caller(request, who), per_minute())

    return Depends(check)


def address_headers(request: Request) -> dict[str, str]:
    """The default limit's figures for a request that matched no route (no dependency ran), counted
    against its address."""
    try:
        verdict = limits.hit(broker_redis(), "default", _address(request), runtime.value("rate_limit_per_minute"))
    except redis.RedisError:
        return {}
    return verdict.headers()
