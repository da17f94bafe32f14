"""Who is calling, counted against the default rate limit: on the event loop, in one Redis round trip
for a key this process has seen, and no database work.

A key checked in PostgreSQL is kept in this process's cache, by its hash, with the value of
`pipelines.auth.keys.GENERATION` read before the check. Each request reads that value in the same
round trip that counts it against its limit; a cached key is used only while the value is unchanged
(any revocation or rotation, in any process, sets a new one once committed), while it has not
expired, and for at most CACHE_SECONDS, which also bounds how long a change could go unseen if Redis
was away when it was made. With Redis away, nothing is cached and every request checks its key in
PostgreSQL. Invalid keys are never cached: they are counted against the client's address.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from api import limits
from api.envelope import ApiError
from pipelines.auth import keys, oidc, users
from pipelines.auth.limits import Bucket
from pipelines.auth.principal import AUTH_DISABLED, Principal
from pipelines.core.db import session_scope
from pipelines.core.settings import get_settings

CACHE_SECONDS = 30.0
_MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Identity:
    """Who the credentials of a request name, checked once per request (the rate limiter and the
    route share it): the PRINCIPAL when they are valid, else why not."""

    principal: Principal | None
    problem: ApiError | None  # None with no principal: no credentials were given


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    valid_until: datetime | None  # the key's expiry, or the end of a rotation's grace period
    generation: bytes
    checked_at: float

    def usable(self, generation: bytes | None) -> bool:
        return (generation == self.generation and time.monotonic() - self.checked_at < CACHE_SECONDS
                and (self.valid_until is None or self.valid_until > datetime.now(UTC)))


_cache: dict[str, _Entry] = {}



def bearer(request: Request) -> str | None:
    """What REQUEST's `Authorization: Bearer` header carries (a token, or a key sent that way), if any."""
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    return credential if scheme.lower() == "bearer" and credential else None


def _invalid_key() -> ApiError:
    return ApiError(401, "the API key is not valid or was revoked", headers={"WWW-Authenticate": "ApiKey"})


def _invalid_token() -> ApiError:
    return ApiError(401, "the bearer token is not valid or has expired", headers={"WWW-Authenticate": "Bearer"})


async def identify(request: Request) -> Identity:
    """The caller of REQUEST, counted against the default limit (429 past it)."""
    if get_settings().auth_disabled:
        who = Identity(AUTH_DISABLED, None)
        await limits.count_default(request, who.principal)
        return who
    supplied = request.headers.get("x-api-key")
    if not supplied:
        token = bearer(request)
        if token and not keys.looks_like_key(token):
            who = await run_in_threadpool(_token_identity, token)
            if who.principal is not None:
                request.state.api_key_id = who.principal.id  # the user, in the access line
            await limits.count_default(request, who.principal)
            return who
        supplied = token
    if not supplied:
        who = Identity(None, None)
        await limits.count_default(request, who.principal)
        return who
    return await _key_identity(request, supplied)


async def _key_identity(request: Request, supplied: str) -> Identity:
    digest = keys.hash_key(supplied)
    entry = _cache.get(digest)
    counter = Bucket.of("default", limits.caller(request, entry.principal if entry else None),
                        limits.default_limit(entry.principal if entry else None))
    try:
        # Most requests: the key is known, counted in the same round trip.
        generation, *counted = await limits.call(("GET", keys.GENERATION),
                                                        *(counter.commands() if entry is not None else ()))
        generation = generation or b"-"  # none yet (or Redis lost it): cached under that, until one is set
    except redis.RedisError:
        generation, counted = None, []
        _cache.clear()  # changes made meanwhile could not be announced
    if entry is not None and entry.usable(generation):
        who = Identity(entry.principal, None)
    else:
        _cache.pop(digest, None)
        checked = await keys.authenticate(supplied)
        if checked is None:
            who = Identity(None, _invalid_key())
        else:
            key, valid_until = checked
            principal = Principal.of_key(key)
            who = Identity(principal, None)
            if generation is not None:
                if len(_cache) >= _MAX_ENTRIES:
                    _cache.clear()
                _cache[digest] = _Entry(principal, valid_until, generation, time.monotonic())
        if not counted or who.principal is None or who.principal.id != entry.principal.id:  # type: ignore[union-attr]
            await limits.count_default(request, who.principal)
            counted = []
    if who.principal is not None:
        request.state.api_key_id = who.principal.id
    if counted:
        limits.apply(request, counter.verdict(counted[0]))
    return who


def _token_identity(token: str) -> Identity:
    """A user logged in here; or, when an OpenID Connect issuer is configured and the token is signed as
    it signs, the person it names."""
    if oidc.configured() and oidc.is_theirs(token):
        person = oidc.verify(token)
        if person is None:
            return Identity(None, _invalid_token())
        return Identity(Principal.of_person(person.subject, person.name, person.scopes, person.expires), None)
    with session_scope() as session:
        found = users.verified(session, token)
        if found is None:
            return Identity(None, _invalid_token())
        user, claims = found
        return Identity(Principal.of_user(user, users.token_id(token, claims), float(claims["exp"])), None)
