"""API keys: random, shown once, stored only as a SHA-256 hash (they are high-entropy, so a fast
hash is the right one; passwords get a slow one).

Every committed change to a key that could refuse it (revoked, rotated) sets a new random value at
GENERATION in Redis: API processes that cache keys (`api.identity`) check each cached key against it
on every request, so the change takes effect at the next request in each of them.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import UTC, datetime, timedelta

import redis
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pipelines.auth import limits
from pipelines.auth.principal import SCOPES
from pipelines.core import adb, embedded
from pipelines.core.db import affected, on_commit
from pipelines.core.errors import Invalid
from pipelines.core.models import ApiKey
from pipelines.core.settings import get_settings
from pipelines.webhooks import endpoints

log = logging.getLogger(__name__)
GENERATION = "ingot:keys:generation"

LAST_USED_RESOLUTION = timedelta(minutes=1)


PREFIX = "ingot_"  # every key begins so: it tells a key sent as a bearer credential from a token


def looks_like_key(credential: str) -> bool:
    return credential.startswith(PREFIX)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _secret() -> str:
    return f"{PREFIX}{secrets.token_urlsafe(32)}"


def create_key(session: Session, name: str, scopes: list[str], expires_at: datetime | None = None,
               rate_limit_per_minute: int | None = None, tier: str = "basic") -> tuple[ApiKey, str]:
    """A new key (and its secret, to be shown once) in TIER's rate limit, or limited to
    RATE_LIMIT_PER_MINUTE requests when given: refused for unknown scopes or tier, a past expiry or
    a limit below 1 (Invalid)."""
    known = limits.configured()
    if tier not in known:
        raise Invalid(f"tier must be among {', '.join(sorted(known))}; got {tier!r}")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise Invalid(f"scopes must be among {', '.join(SCOPES)}; got {', '.join(scopes) or 'none'}")
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise Invalid("expires_at must be in the future")
    if rate_limit_per_minute is not None and rate_limit_per_minute < 1:
        raise Invalid("rate_limit_per_minute must be at least 1")
    key = _secret()
    row = ApiKey(name=name, prefix=key[:12], key_hash=hash_key(key), scopes=sorted(set(scopes)),
                 expires_at=expires_at, rate_limit_per_minute=rate_limit_per_minute, tier=tier)
    session.add(row)
    session.flush()
    return row, key


_LOOKUP = (
    "SELECT id, name, prefix, scopes, created_at, last_used_at, expires_at, rate_limit_per_minute, tier, "
    "CASE WHEN key_hash = %(digest)s THEN expires_at ELSE LEAST(expires_at, previous_valid_until) END AS valid_until "
    "FROM api_keys WHERE (key_hash = %(digest)s OR (previous_hash = %(digest)s AND previous_valid_until > now())) "
    "AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
)


async def authenticate(key: str) -> tuple[ApiKey, datetime | None] | None:
    """The live key KEY is (or was, within a rotation's grace period) and when it stops being valid
    (None: not by itself), else None. Its `last_used_at` is written at most once a minute."""
    row = await adb.fetch_one(_LOOKUP, {"digest": hash_key(key)})
    if row is None:
        return None
    valid_until = row.pop("valid_until")
    now = datetime.now(UTC)
    if row["last_used_at"] is None or now - row["last_used_at"] > LAST_USED_RESOLUTION:
        await adb.execute("UPDATE api_keys SET last_used_at = %s WHERE id = %s", (now, row["id"]))
    return ApiKey(**row), valid_until


def _changed(session: Session) -> None:
    """Tell the API processes that cache keys, once SESSION commits, to check theirs again."""
    on_commit(session, new_generation)


def new_generation() -> None:
    try:
        redis.Redis.from_url(embedded.redis_url(get_settings()), socket_timeout=2).set(
            GENERATION, secrets.token_hex(8))
    except redis.RedisError:  # the caches check their keys again within api.identity.CACHE_SECONDS
        log.warning("could not tell the API processes that a key changed (Redis unavailable)")


def get(session: Session, key_id: str) -> ApiKey | None:
    return session.get(ApiKey, key_id, populate_existing=True)  # as this transaction left it


def rotate(session: Session, key_id: str, grace: timedelta) -> tuple[ApiKey, str] | None:
    """A new secret for KEY_ID; the old one keeps working for GRACE. None if there is no live key."""
    row = session.get(ApiKey, key_id, with_for_update=True)
    if row is None or row.revoked_at is not None:
        return None
    key = _secret()
    row.previous_hash, row.previous_valid_until = row.key_hash, datetime.now(UTC) + grace
    row.key_hash, row.prefix = hash_key(key), key[:12]
    session.flush()
    _changed(session)
    return row, key


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke(session: Session, key_id: str) -> bool:
    """Revoke KEY_ID at once: it is refused from the next request, and its webhooks stop receiving
    (disabled with the reason `key_revoked`) in the same transaction."""
    _changed(session)
    result = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=datetime.now(UTC))
    )
    endpoints.close_orphaned(session)
    return bool(affected(result))


def live_named(session: Session, name: str) -> ApiKey | None:
    """The newest live key called NAME, if any."""
    return session.scalars(select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
                           .order_by(ApiKey.created_at.desc()).limit(1)).first()
