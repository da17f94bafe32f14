"""Rate limiting as the API applies it: who a request counts against, and the figures it is told.

The default limit is counted where the caller is identified (`api.identity`, in the same Redis round
trip); tighter limits per route are `api.deps.limit(...)`. Everything here runs on the event loop.
"""

from __future__ import annotations

import redis
from fastapi import Request

from api.envelope import ApiError
from api.redispipe import Pipe
from pipelines.auth import limits
from pipelines.auth.limits import Bucket, Rate, Verdict, with_scripts
from pipelines.auth.principal import Principal
from pipelines.core import embedded
from pipelines.core.loops import PerLoop
from pipelines.core.settings import get_settings

_pipes = PerLoop(lambda: Pipe(embedded.redis_url(get_settings())))


def pipe() -> Pipe:
    """This event loop's connection to Redis."""
    return _pipes.get()


def close() -> None:
    """Close this event loop's connection to Redis (the server is stopping)."""
    found = _pipes.pop()
    if found is not None:
        found.close()


async def call(*commands: tuple) -> list:
    """COMMANDS' replies in one round trip; a rate-limit script Redis does not know yet is sent whole
    and the whole call made again (once after each Redis restart)."""
    try:
        return await pipe().call(*commands)
    except redis.ResponseError as exc:
        if not str(exc).startswith("NOSCRIPT"):
            raise
        return await pipe().call(*with_scripts(list(commands)))


async def hit(bucket: str, who: str, rate: Rate) -> Verdict:
    """Take one token from WHO's bucket of BUCKET."""
    taker = Bucket.of(bucket, who, rate)
    (reply,) = await call(*taker.commands())
    return taker.verdict(reply)


def address(request: Request) -> str:
    return "ip:" + (request.client.host if request.client else "unknown")


def caller(request: Request, who: Principal | None) -> str:
    """The authenticated principal, whatever header or spelling carried its credentials; else (none
    given, or not valid) the client address alone, so invented keys share one bucket."""
    return f"principal:{who.id}" if who is not None else address(request)


def default_limit(who: Principal | None) -> Rate:
    """WHO's rate: its own limit if it was given one, else its tier's; with no valid credentials, the
    unauthenticated rate (per address)."""
    if who is None:
        rate = get_settings().unauthenticated_rate_limit_per_minute
        return Rate(rate, rate)
    if who.rate_limit_per_minute:
        return Rate(who.rate_limit_per_minute, who.rate_limit_per_minute)
    known = limits.configured()
    return known.get(who.tier, known["basic"])


def apply(request: Request, verdict: Verdict, bucket: str = "default") -> None:
    """Show VERDICT's figures on the answer (the tightest limit on the route is the one shown, on
    whatever answer it gets: see api.access); 429 past the limit."""
    shown = getattr(request.state, "rate_limit_headers", None)
    if shown is None or int(shown["X-RateLimit-Remaining"]) > verdict.remaining:
        request.state.rate_limit_headers = verdict.headers()
    if not verdict.allowed:
        from api.metrics import RATE_LIMITED

        RATE_LIMITED.labels(bucket).inc()
        retry = verdict.retry_after
        raise ApiError(429, f"rate limit of {verdict.limit} requests per minute exceeded; retry in {retry} s",
                       headers={**verdict.headers(), "Retry-After": str(retry)})


async def count(request: Request, bucket: str, who: str, limit: int | Rate) -> None:
    """Count one request of WHO against BUCKET's LIMIT (a minute's worth at once, then that rate); 429
    past it."""
    try:
        verdict = await hit(bucket, who, limit if isinstance(limit, Rate) else Rate(limit, limit))
    except redis.RedisError:
        return  # a limiter that cannot count lets requests through rather than taking the API down
    apply(request, verdict, bucket)


async def count_default(request: Request, who: Principal | None) -> None:
    """Count one request against the default limit: WHO's (its own tier, or the default), or with no
    valid credentials, the client address's."""
    await count(request, "default", caller(request, who), default_limit(who))


async def address_headers(request: Request) -> dict[str, str]:
    """The default limit's figures for a request that matched no route (no dependency ran), counted
    against its address."""
    try:
        verdict = await hit("default", address(request), default_limit(None))
    except redis.RedisError:
        return {}
    return verdict.headers()
