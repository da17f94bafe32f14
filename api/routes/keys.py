"""API keys over HTTP, for admins: create (the secret shown once), list, revoke, rotate with a grace
period. Keys are stored only as hashes; no answer but the one that makes a secret ever holds it."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, StrictFloat

from api.deps import Admin, SessionDep
from api.envelope import JSON_INTEGER, Envelope, IsoDateTime, UTCDateTime, found, ok
from pipelines.auth import keys
from pipelines.core.models import ApiKey

router = APIRouter(prefix="/keys", tags=["keys"])


class KeyIn(BaseModel):
    model_config = {"extra": "forbid"}

    name: str = Field(min_length=1, max_length=200)
    scopes: list[Literal["read", "write", "admin"]] = Field(min_length=1)
    expires_at: IsoDateTime | None = None
    # Its rate limit's tier (`basic`, `premium`, `unlimited`, or as configured), or its own requests a
    # minute (over the tier's).
    tier: str = Field(default="basic", min_length=1, max_length=50)
    rate_limit_per_minute: Annotated[int, Field(ge=1, le=10_000_000), JSON_INTEGER] | None = None


class Rotate(BaseModel):
    model_config = {"extra": "forbid"}

    grace_hours: StrictFloat = Field(default=24, ge=0, le=24 * 30)  # how long the old secret keeps working


class KeyOut(BaseModel):
    id: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: UTCDateTime
    expires_at: UTCDateTime | None
    last_used_at: UTCDateTime | None
    revoked_at: UTCDateTime | None
    previous_valid_until: UTCDateTime | None
    tier: str
    rate_limit_per_minute: int | None

    @classmethod
    def of(cls, key: ApiKey) -> KeyOut:
        return cls.model_validate(key, from_attributes=True)


class KeyCreated(KeyOut):
    key: str


@router.post("", status_code=201, response_model=Envelope[KeyCreated])
def create(body: KeyIn, request: Request, session: SessionDep, _admin: Admin) -> dict:
    """A new key; its secret is in this answer only."""
    row, secret = keys.create_key(session, body.name, list(body.scopes), body.expires_at,
                                  body.rate_limit_per_minute, body.tier)
    return ok(request, {**KeyOut.of(row).model_dump(), "key": secret},
              message="store the key now: it is not shown again")


class KeyList(BaseModel):
    keys: list[KeyOut]


@router.get("", response_model=Envelope[KeyList])
def list_keys(request: Request, session: SessionDep, _admin: Admin) -> dict:
    return ok(request, {"keys": [KeyOut.of(k) for k in keys.list_keys(session)]}, next_cursor=None)


@router.delete("/{key_id}", response_model=Envelope[KeyOut])
def revoke(key_id: str, request: Request, session: SessionDep, _admin: Admin) -> dict:
    """Revoke a key: its next request is refused."""
    found(keys.get(session, key_id), f"no key '{key_id}'")
    keys.revoke(session, key_id)
    return ok(request, KeyOut.of(found(keys.get(session, key_id), f"no key '{key_id}'")), message="key revoked")


@router.post("/{key_id}/rotate", response_model=Envelope[KeyCreated])
def rotate(key_id: str, request: Request, session: SessionDep, _admin: Admin, body: Rotate | None = None) -> dict:
    """A new secret for the key; the old one keeps working for the grace period (24 h by default)."""
    rotated = keys.rotate(session, key_id, timedelta(hours=(body or Rotate()).grace_hours))
    row, secret = found(rotated, f"no live key '{key_id}'")
    return ok(request, {**KeyOut.of(row).model_dump(), "key": secret},
              message="store the new key now: it is not shown again")
