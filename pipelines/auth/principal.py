"""Who is calling: an API key or a person (signed in here, or at the configured identity provider),
with its scopes, its rate limit and the id that owns its work. Routes and domains receive this, never a
key's row: a person is not a key, and nothing needs to pretend otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.core.models import ApiKey, User

SCOPES = ("read", "write", "admin")
# Each scope includes the ones below it: admin can write, write can read.
_IMPLIED = {"admin": {"admin", "write", "read"}, "write": {"write", "read"}, "read": {"read"}}


@dataclass(frozen=True)
class Principal:
    id: str  # a key's id, a user's, or `oidc:<subject>`: what its jobs, exports and webhooks are owned by
    kind: Literal["key", "user"]
    name: str
    scopes: tuple[str, ...]
    rate_limit_per_minute: int | None = None  # a key's own limit; None: its tier's
    tier: str = "basic"
    token_id: str | None = None  # a person signed in here: the id a logout of their token records
    expires: float | None = None  # a person's token: when it expires (epoch seconds)

    @classmethod
    def of_key(cls, key: ApiKey) -> Principal:
        return cls(key.id, "key", key.name, tuple(key.scopes), key.rate_limit_per_minute, key.tier or "basic")

    @classmethod
    def of_user(cls, user: User, token_id: str | None = None, expires: float | None = None) -> Principal:
        return cls(user.id, "user", user.username, tuple(user.scopes), token_id=token_id, expires=expires)

    @classmethod
    def of_person(cls, subject: str, name: str, scopes: list[str], expires: float | None = None) -> Principal:
        """Someone the identity provider vouches for (until EXPIRES, when their token does)."""
        return cls(f"oidc:{subject}", "user", name, tuple(scopes), expires=expires)

    def grants(self, scope: str) -> bool:
        return any(scope in _IMPLIED.get(held, set()) for held in self.scopes)

    @property
    def owner(self) -> str | None:
        """Whose objects (jobs of their own, exports, webhooks) it may see: its own, or everyone's
        (None) for an admin."""
        return None if self.grants("admin") else self.id


AUTH_DISABLED = Principal("key_auth_disabled", "key", "auth disabled", ("admin",))
