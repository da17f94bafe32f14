"""Logging in: username and password for a short-lived bearer token."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from api.deps import ReadKey, SessionDep, limit
from api.envelope import ApiError, Envelope, ok
from pipelines.auth import users

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
def login(body: Login, request: Request, session: SessionDep) -> dict:
    """Exchange a user's credentials for a bearer token (`Authorization: Bearer ...`)."""
    issued = users.login(session, body.username, body.password)
    if issued is None:
        raise ApiError(401, "wrong username or password")
    token, lifetime = issued
    return ok(request, {"access_token": token, "token_type": "bearer", "expires_in": lifetime})


class Me(BaseModel):
    id: str
    kind: Literal["key", "user"]
    name: str
    scopes: list[str]


@router.get("/me", response_model=Envelope[Me])
async def me(request: Request, key: ReadKey) -> dict:
    """Who the credentials of this request name: a key or a logged-in user, and its scopes."""
    kind = "user" if key.id.startswith("usr_") else "key"
    return ok(request, {"id": key.id, "kind": kind, "name": key.name, "scopes": list(key.scopes)})
