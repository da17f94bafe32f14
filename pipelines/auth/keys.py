"""API keys: random, shown once, stored only as a SHA-256 hash (they are high-entropy, so a fast
hash is the right one; passwords get a slow one)."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from pipelines.core.db import affected
from pipelines.core.models import ApiKey

SCOPES = ("read", "write", "admin")
LAST_USED_RESOLUTION = timedelta(minutes=1)
# Each scope includes the ones below it: admin can write, write can read.
_IMPLIED = {"admin": {"admin", "write", "read"}, "write": {"write", "read"}, "read": {"read"}}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _secret() -> str:
    return f"ingot_{secrets.token_urlsafe(32)}"


def create_key(session: Session, name: str, scopes: list[str], expires_at: datetime | None = None,
               rate_limit_per_minute: int | None = None) -> tuple[ApiKey, str]:
    """A new key (and its secret, to be shown once), limited to RATE_LIMIT_PER_MINUTE requests when
    given instead of the default limit; ValueError for unknown scopes, a past expiry or a limit below 1."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes must be among {', '.join(SCOPES)}; got {', '.join(scopes) or 'none'}")
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise ValueError("expires_at must be in the future")
    if rate_limit_per_minute is not None and rate_limit_per_minute < 1:
        raise ValueError("rate_limit_per_minute must be at least 1")
    key = _secret()
    row = ApiKey(name=name, prefix=key[:12], key_hash=hash_key(key), scopes=sorted(set(scopes)),
                 expires_at=expires_at, rate_limit_per_minute=rate_limit_per_minute)
    session.add(row)
    session.flush()
    return row, key


_KEY_COLUMNS = [ApiKey.__table__.c[name] for name in (
    "id", "name", "prefix", "scopes", "created_at", "last_used_at", "expires_at", "rate_limit_per_minute")]


def authenticate(session: Session, key: str) -> ApiKey | None:
    """The live key KEY is (or was, within a rotation's grace period), else None: a detached copy of
    its row, read with a plain select (this runs on every request; the ORM's bookkeeping of a loaded
    object costs several times the query)."""
    digest, now = hash_key(key), datetime.now(UTC)
    row = session.execute(
        select(*_KEY_COLUMNS).where(
            or_(ApiKey.key_hash == digest,
                and_(ApiKey.previous_hash == digest, ApiKey.previous_valid_until > now)),
            ApiKey.revoked_at.is_(None),
            or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now),
        )
    ).one_or_none()
    if row is None:
        return None
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:  # not a write per request
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
    return ApiKey(**row._asdict())


def get(session: Session, key_id: str) -> ApiKey | None:
    return session.get(ApiKey, key_id)


def rotate(session: Session, key_id: str, grace: timedelta) -> tuple[ApiKey, str] | None:
    """A new secret for KEY_ID; the old one keeps working for GRACE. None if there is no live key."""
    row = session.get(ApiKey, key_id, with_for_update=True)
    if row is None or row.revoked_at is not None:
        return None
    key = _secret()
    row.previous_hash, row.previous_valid_until = row.key_hash, datetime.now(UTC) + grace
    row.key_hash, row.prefix = hash_key(key), key[:12]
    session.flush()
    return row, key


def owner_filter(key: ApiKey) -> str | None:
    """Whose objects (webhooks, exports) KEY may see: its own, or everyone's (None) for an admin."""
    return None if grants(key, "admin") else key.id


def grants(key: ApiKey, scope: str) -> bool:
    return any(scope in _IMPLIED.get(held, set()) for held in key.scopes)


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke(session: Session, key_id: str) -> bool:
    result = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=datetime.now(UTC))
    )
    return bool(affected(result))


def revoke_named(session: Session, name: str) -> int:
    result = session.execute(
        update(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)).values(revoked_at=datetime.now(UTC))
    )
    return affected(result)
