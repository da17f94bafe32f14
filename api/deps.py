"""Dependencies: a session per request (the request owns the transaction), the scopes the caller
needs, and the tighter limits of some routes.

The caller was identified and counted before the request was routed (`api.gate`). A sync dependency
costs a trip to a worker thread and back: these are async, so a route served on the event loop
(`pipelines.core.adb`) makes none, and a sync route makes two (itself, and the commit of its session).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import limits
from api.envelope import ApiError
from api.identity import Identity, bearer
from pipelines.auth import keys
from pipelines.auth.principal import Principal
from pipelines.core import runtime
from pipelines.core.db import abandon, new_session


async def get_session() -> AsyncIterator[Session]:
    # No connection yet: the first query takes one from the pool whose statements are time-limited.
    session = new_session(limited=True)
    try:
        yield session
    except Exception:
        await _finish(session, False)
        raise
    except BaseException:  # cancelled (api.deadline): a thread may still be using the session
        abandon(session)
        raise
    await _finish(session, True)


async def _finish(session: Session, commit: bool) -> None:
    if session.in_transaction():
        await run_in_threadpool(_end, session, commit)
    else:  # nothing was asked of the database: nothing to end there
        session.close()


def _end(session: Session, commit: bool) -> None:
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()


# Ended when the route returns, before its answer is sent: what the answer reports has been committed
# (a client may ask for the job it was given at once), and a failed commit is the answer.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def identity(request: Request) -> Identity:
    """Who is calling, as `api.gate` found when it let the request in."""
    return request.state.identity


def _caller(request: Request) -> Principal:
    who = identity(request)
    if who.principal is not None:
        return who.principal
    raise who.problem or ApiError(401, "an API key (X-API-Key) or a bearer token is required",
                                  headers={"WWW-Authenticate": "Bearer"})


# The two credentials, as the OpenAPI document declares them (Swagger's Authorize, generated clients):
# every operation that needs a scope lists both, either one sufficing. Reading them here checks
# nothing: `api.gate` identified the caller before the request was routed.
API_KEY = APIKeyHeader(name="X-API-Key", scheme_name="ApiKey", auto_error=False,
                       description="An API key (`ingot keys create`, or `POST /api/v1/keys` by an admin).")
BEARER = HTTPBearer(scheme_name="BearerToken", bearerFormat="JWT", auto_error=False,
                    description="A token from `POST /api/v1/auth/login`, or from the configured OpenID Connect "
                                "issuer.")
KeyHeader = Annotated[str | None, Security(API_KEY)]
BearerHeader = Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]


def require(scope: str):
    """A dependency that lets the request through only with a caller holding SCOPE: the caller."""

    async def check(request: Request, _key: KeyHeader = None, _token: BearerHeader = None) -> Principal:
        caller = _caller(request)
        if not caller.grants(scope):
            raise ApiError(403, f"this {'API key' if caller.kind == 'key' else 'user'} lacks the '{scope}' scope")
        return caller

    return Depends(check)


def bearer_token(request: Request, _token: BearerHeader = None) -> str:
    """The bearer token from /auth/login this request carries, for the routes that act on the token
    itself (refresh, logout): the document declares only BearerToken for them, and a key, or a token
    that is no longer valid, is 401."""
    token = bearer(request)
    if request.headers.get("x-api-key") or not token or keys.looks_like_key(token):
        raise ApiError(401, "this route takes the bearer token from /auth/login, alone (a key is revoked with "
                            "DELETE /api/v1/keys/{key_id})", headers={"WWW-Authenticate": "Bearer"})
    _caller(request)
    return token


BearerToken = Annotated[str, Depends(bearer_token)]
Reader = Annotated[Principal, require("read")]
Writer = Annotated[Principal, require("write")]
Admin = Annotated[Principal, require("admin")]


def limit(bucket: str, knob: str, by_address: bool = False):
    """A dependency limiting a route to as many requests a minute per caller as the runtime setting
    KNOB says (per client address alone with BY_ADDRESS: for logging in, where there is no principal)."""

    async def check(request: Request) -> None:
        who = limits.address(request) if by_address else limits.caller(request, identity(request).principal)
        await limits.count(request, bucket, who, runtime.current(knob))

    return Depends(check)
