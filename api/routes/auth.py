"""Logging in: username and password for a short-lived bearer token."""

from __future__ import annotations

import time
from typing import Literal

import redis
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api import limits
from api.deps import BearerToken, Reader, limit
from api.envelope import ApiError, Envelope, ok
from pipelines.auth import users
from pipelines.auth.limits import Account
from pipelines.core.db import session_scope

router = APIRouter(prefix="/auth", tags=["auth"])


class Login(BaseModel):
    model_config = {"extra": "forbid"}

    username: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=1, max_length=1000)


class Token(BaseModel):
    access_token: str
    token_type: str
    expires_in: int


@router.post("/login", response_model=Envelope[Token],
             dependencies=[limit("login", "login_rate_limit_per_minute", by_address=True)])
async def login(body: Login, request: Request) -> dict:
    """Exchange a user's credentials for a bearer token (`Authorization: Bearer ...`). Besides the
    limit per address, each account waits longer and longer after failed tries in a row (5 free,
    then 1 s, 2 s, 4 s ... up to 15 minutes), counted by every API process whatever the address."""
    account = Account.named(body.username)
    try:
        (reply,) = await limits.pipe().call(account.read())
    except redis.RedisError:
        raise _uncounted() from None
    left = Account.wait_left(reply, time.time())
    if left:
        raise ApiError(429, f"too many failed logins for this account; try again in {left} s",
                       headers={"Retry-After": str(left)})
    issued = await run_in_threadpool(_in_session, users.login, body.username, body.password)
    try:
        await limits.pipe().call(*(account.succeeded() if issued else account.failed(time.time())))
    except redis.RedisError:
        raise _uncounted() from None
    if issued is None:
        raise ApiError(401, "wrong username or password")
    token, lifetime = issued
    return ok(request, {"access_token": token, "token_type": "bearer", "expires_in": lifetime})


def _uncounted() -> ApiError:
    """Logging in is refused rather than left uncounted: without Redis, failed tries could go on
    forever. (Other routes stay open without counting: see README, Authentication.)"""
    return ApiError(503, "logging in is unavailable while its limits cannot be counted; try again shortly",
                    headers={"Retry-After": "5"})


class Me(BaseModel):
    id: str
    kind: Literal["key", "user"]
    name: str
    scopes: list[str]


@router.get("/me", response_model=Envelope[Me])
async def me(request: Request, caller: Reader) -> dict:
    """Who the credentials of this request name: a key or a logged-in user, and its scopes."""
    return ok(request, {"id": caller.id, "kind": caller.kind, "name": caller.name, "scopes": list(caller.scopes)})


class LoggedOut(BaseModel):
    logged_out: bool


@router.post("/refresh", response_model=Envelope[Token])
async def refresh(request: Request, token: BearerToken) -> dict:
    """A fresh token for the valid one this request carries: a new lifetime, the user's scopes as they
    are now. The old one stays valid until it expires (log it out to end it sooner)."""
    issued = await run_in_threadpool(_in_session, users.refresh, token)
    if issued is None:
        raise ApiError(401, "the bearer token is not valid or has expired", headers={"WWW-Authenticate": "Bearer"})
    token, lifetime = issued
    return ok(request, {"access_token": token, "token_type": "bearer", "expires_in": lifetime})


@router.post("/logout", response_model=Envelope[LoggedOut])
async def logout(request: Request, token: BearerToken) -> dict:
    """End the bearer token this request carries: every API process refuses it from now until it would
    have expired."""
    if not await run_in_threadpool(_in_session, users.logout, token):
        raise ApiError(401, "the bearer token is not valid or has expired", headers={"WWW-Authenticate": "Bearer"})
    return ok(request, {"logged_out": True})


def _in_session(act, *args):
    """ACT(session, *ARGS) in a session of its own, committed when it returns (run in a thread)."""
    with session_scope() as session:
        return act(session, *args)
