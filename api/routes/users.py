"""Users over HTTP, for admins: create, list, disable. Passwords are never answered, only kept as slow
hashes (`pipelines.auth.users`); a disabled user's tokens are refused from their next request."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from api.deps import Admin, SessionDep
from api.envelope import Envelope, UTCDateTime, ok
from pipelines.auth import users
from pipelines.core.models import User

router = APIRouter(prefix="/users", tags=["users"])


class UserIn(BaseModel):
    model_config = {"extra": "forbid"}

    username: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=12, max_length=1000)
    scopes: list[Literal["read", "write", "admin"]] = Field(min_length=1)


class UserOut(BaseModel):
    id: str
    username: str
    scopes: list[str]
    created_at: UTCDateTime
    disabled_at: UTCDateTime | None

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls.model_validate(user, from_attributes=True)


class UserList(BaseModel):
    users: list[UserOut]


@router.post("", status_code=201, response_model=Envelope[UserOut])
def create(body: UserIn, request: Request, session: SessionDep, _admin: Admin) -> dict:
    return ok(request, UserOut.of(users.create_user(session, body.username, body.password, list(body.scopes))))


@router.get("", response_model=Envelope[UserList])
def list_users(request: Request, session: SessionDep, _admin: Admin) -> dict:
    return ok(request, {"users": [UserOut.of(u) for u in users.list_users(session)]}, next_cursor=None)


@router.post("/{user_id}/disable", response_model=Envelope[UserOut])
def disable(user_id: str, request: Request, session: SessionDep, _admin: Admin) -> dict:
    """Disable a user: its tokens are refused from their next request, and it cannot log in."""
    return ok(request, UserOut.of(users.disable(session, user_id)))
