"""Dependencies: a session per request (the request owns the transaction), the caller, and the limits
counted against it.

A sync dependency costs a trip to a worker thread and back; the ones here that do no I/O are async so
that a request makes as few of those trips as it can: one to identify its caller and count it against
the default rate limit, one for the route, one to commit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import limits
from api.envelope import ApiError
from pipelines.auth import keys, users
from pipelines.core.db import new_session
from pipelines.core.models import ApiKey
from pipelines.core.settings import get_settings


async def get_session() -> AsyncIterator[Session]:
    session = new_session()  # no connection yet: the first query takes one from the pool
    try:
        yield session
    except Exception:
        await run_in_threadpool(_end, session, False)
        raise
    await run_in_threadpool(_end, session, True)


def _end(session: Session, commit: bool) -> None:
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


@dataclass(frozen=True)
class Principal:
    """Who the credentials of a request name, checked once per request (the rate limiter and the
    route share it): KEY when they are valid, else why not."""

    key: ApiKey | None
    problem: ApiError | None  # None with no key: no credentials were given


def principal(request: Request, session: SessionDep) -> Principal:
    """Who is calling, counted against the default rate limit (every /api/v1 route depends on this)."""
    try:
        who = _identify(request, session)
    except OperationalError:  # the database is away: routes that need a caller answer 503, the rest go on
        session.rollback()
        who = Principal(None, ApiError(503, "the database is unavailable; try again shortly",
                                       headers={"Retry-After": "5"}))
    limits.count_default(request, who.key)
    return who


def _identify(request: Request, session: Session) -> Principal:
    if get_settings().auth_disabled:
        return Principal(ApiKey(id="key_auth_disabled", name="auth disabled", prefix="", key_hash="",
                                scopes=["admin"]), None)
    supplied = request.headers.get("x-api-key")
    if not supplied:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token and not token.startswith("ingot_"):
            return _token_principal(request, session, token)
        supplied = token if scheme.lower() == "bearer" else None
    if not supplied:
        return Principal(None, None)
    key = keys.authenticate(session, supplied)
    if key is None:
        return Principal(None, ApiError(401, "the API key is not valid or was revoked",
                                        headers={"WWW-Authenticate": "ApiKey"}))
    request.state.api_key_id = key.id
    return Principal(key, None)


def _token_principal(request: Request, session: Session, token: str) -> Principal:
    """A logged-in user, standing in the place of a key with the user's scopes."""
    user = users.verify(session, token)
    if user is None:
        return Principal(None, ApiError(401, "the bearer token is not valid or has expired",
                                        headers={"WWW-Authenticate": "Bearer"}))
    request.state.api_key_id = user.id
    return Principal(ApiKey(id=user.id, name=user.username, prefix="", key_hash="", scopes=user.scopes), None)


PrincipalDep = Annotated[Principal, Depends(principal)]


async def _current_key(who: PrincipalDep) -> ApiKey:
    if who.key is not None:
        return who.key
    raise who.problem or ApiError(401, "an API key (X-API-Key) or a bearer token is required",
                                  headers={"WWW-Authenticate": "Bearer"})


CurrentKey = Annotated[ApiKey, Depends(_current_key)]


def require(scope: str):
    """A dependency that lets the request through only with a key holding SCOPE."""

    async def check(key: CurrentKey) -> ApiKey:
        if not keys.grants(key, scope):
            raise ApiError(403, f"this API key lacks the '{scope}' scope")
        return key

    return Depends(check)


ReadKey = Annotated[ApiKey, require("read")]
WriteKey = Annotated[ApiKey, require("write")]
AdminKey = Annotated[ApiKey, require("admin")]


def limit(bucket: str, per_minute, by_address: bool = False):
    """A dependency limiting a route to PER_MINUTE() requests a minute per caller (per client address
    alone with BY_ADDRESS: for logging in, where there is no principal yet)."""

    def check(request: Request, who: PrincipalDep) -> None:
        limits.count(request, bucket, limits.address(request) if by_address else limits.caller(request, who.key),
                     per_minute())

    return Depends(check)
