"""Dependencies: a session per request (the request owns the transaction) and the caller's key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.envelope import ApiError
from pipelines.auth import keys, users
from pipelines.core.db import new_session
from pipelines.core.models import ApiKey
from pipelines.core.settings import get_settings


def get_session() -> Iterator[Session]:
    session = new_session()
    try:
        yield session
        session.commit()
    except Exception:
        session.rollback()
        raise
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def _current_key(request: Request, session: SessionDep) -> ApiKey:
    if get_settings().auth_disabled:
        return ApiKey(id="key_auth_disabled", name="auth disabled", prefix="", key_hash="", scopes=["admin"])
    supplied = request.headers.get("x-api-key")
    if not supplied:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token and not token.startswith("ingot_"):
            return _token_principal(request, session, token)
        supplied = token if scheme.lower() == "bearer" else None
    if not supplied:
        raise ApiError(401, "an API key (X-API-Key) or a bearer token is required",
                       headers={"WWW-Authenticate": "Bearer"})
    key = keys.authenticate(session, supplied)
    if key is None:
        raise ApiError(401, "the API key is not valid or was revoked", headers={"WWW-Authenticate": "ApiKey"})
    request.state.api_key_id = key.id
    return key


def _token_principal(request: Request, session: Session, token: str) -> ApiKey:
    """A logged-in user, standing in the place of a key with the user's scopes."""
    user = users.verify(session, token)
    if user is None:
        raise ApiError(401, "the bearer token is not valid or has expired", headers={"WWW-Authenticate": "Bearer"})
    request.state.api_key_id = user.id
    return ApiKey(id=user.id, name=user.username, prefix="", key_hash="", scopes=user.scopes)


CurrentKey = Annotated[ApiKey, Depends(_current_key)]


def require(scope: str):
    """A dependency that lets the request through only with a key holding SCOPE."""

    def check(key: CurrentKey) -> ApiKey:
        if not keys.grants(key, scope):
            raise ApiError(403, f"this API key lacks the '{scope}' scope")
        return key

    return Depends(check)


ReadKey = Annotated[ApiKey, require("read")]
WriteKey = Annotated[ApiKey, require("write")]
AdminKey = Annotated[ApiKey, require("admin")]
