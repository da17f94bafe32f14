"""API keys: random, shown once, stored only as a SHA-256 hash (they are high-entropy, so a fast
hash is the right one; passwords get a slow one)."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pipelines.core.db import affected
from pipelines.core.models import ApiKey

SCOPES = ("read", "write", "admin")
# Each scope includes the ones below it: admin can write, write can read.
_IMPLIED = {"admin": {"admin", "write", "read"}, "write": {"write", "read"}, "read": {"read"}}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes must be among {', '.join(SCOPES)}; got {', '.join(scopes) or 'none'}")
    key = f"ingot_{secrets.token_urlsafe(32)}"
    row = ApiKey(name=name, prefix=key[:12], key_hash=hash_key(key), scopes=sorted(set(scopes)))
    session.add(row)
    session.flush()
    return row, key


def authenticate(session: Session, key: str) -> ApiKey | None:
    row = session.scalars(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    ).one_or_none()
    if row is not None:
        row.last_used_at = datetime.now(UTC)
    return row


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
