"""Users: passwords kept as scrypt hashes (slow on purpose), short-lived signed tokens (JWT HS256)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from datetime import UTC, datetime
from functools import lru_cache

import jwt
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from pipelines.auth.principal import SCOPES
from pipelines.core.errors import Conflict, Invalid, NotFound
from pipelines.core.models import RevokedToken, User
from pipelines.core.settings import get_settings

_N, _R, _P = 2**15, 8, 1  # scrypt cost: about 50 ms and 32 MiB a check


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=64 * 1024 * 1024)
    return f"scrypt${_N}${_R}${_P}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        _scheme, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=64 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


def create_user(session: Session, username: str, password: str, scopes: list[str]) -> User:
    if len(password) < 12:
        raise Invalid("the password must have at least 12 characters")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise Invalid(f"scopes must be among {', '.join(SCOPES)}")
    if session.scalar(select(User.id).where(User.username == username)):
        raise Conflict(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), scopes=sorted(set(scopes)))
    session.add(user)
    session.flush()
    return user


def login(session: Session, username: str, password: str) -> tuple[str, int] | None:
    """(token, lifetime in seconds) for good credentials, else None (in the same time either way)."""
    user = session.scalar(select(User).where(User.username == username, User.disabled_at.is_(None)))
    if user is None:
        # Spend the same time as a real check, so timing does not tell which usernames exist.
        check_password(password, _dummy_hash())
        return None
    if not check_password(password, user.password_hash):
        return None
    return _issue(user)


def _issue(user: User) -> tuple[str, int]:
    settings = get_settings()
    now = int(time.time())
    claims = {"sub": user.id, "name": user.username, "scopes": user.scopes, "iat": now,
              "exp": now + settings.jwt_expiry_seconds, "iss": "ingot", "jti": secrets.token_urlsafe(16)}
    return jwt.encode(claims, settings.jwt_key(), algorithm="HS256"), settings.jwt_expiry_seconds


def _claims(token: str) -> dict | None:
    try:
        return jwt.decode(token, get_settings().jwt_key(), algorithms=["HS256"], issuer="ingot",
                          options={"require": ["exp", "sub", "iss"]})
    except jwt.PyJWTError:
        return None


def token_id(token: str, claims: dict) -> str:
    """The id a logout records: the token's own `jti`, or (tokens issued before it had one) its hash."""
    return str(claims.get("jti") or hashlib.sha256(token.encode()).hexdigest())


def verified(session: Session, token: str) -> tuple[User, dict] | None:
    """The user a valid, unexpired, not logged-out token names (and who is still enabled), with the
    token's claims; else None."""
    claims = _claims(token)
    if claims is None or session.get(RevokedToken, token_id(token, claims)) is not None:
        return None
    user = session.get(User, claims["sub"])
    return (user, claims) if user is not None and user.disabled_at is None else None


def verify(session: Session, token: str) -> User | None:
    """The user a valid, unexpired, not logged-out token names (and who is still enabled), else None."""
    found = verified(session, token)
    return None if found is None else found[0]


def refresh(session: Session, token: str) -> tuple[str, int] | None:
    """A fresh token (a new lifetime, the user's scopes as they are now) for a valid one, else None."""
    user = verify(session, token)
    return None if user is None else _issue(user)


def logout(session: Session, token: str) -> bool:
    """Refuse TOKEN from now until it would have expired, in every API process (the check is in the
    database each request already reads). False for a token that is not valid anyway."""
    found = verified(session, token)
    if found is None:
        return False
    _user, claims = found
    session.execute(insert(RevokedToken).values(jti=token_id(token, claims),
                                                expires_at=datetime.fromtimestamp(claims["exp"], UTC))
                    .on_conflict_do_nothing())
    # Entries past their token's expiry guard nothing: each logout clears those.
    session.execute(delete(RevokedToken).where(RevokedToken.expires_at < func.now()))
    return True


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.created_at, User.id)))


class UnknownUser(NotFound):
    pass


def disable(session: Session, user_id: str) -> User:
    """Disable USER_ID: its tokens are refused from its next request on (each request reads the user)."""
    user = session.get(User, user_id)
    if user is None:
        raise UnknownUser(f"no user '{user_id}'")
    if user.disabled_at is None:
        user.disabled_at = datetime.now(UTC)
        session.flush()
    return user
