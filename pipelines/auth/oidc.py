"""Bearer tokens from an OpenID Connect issuer (Keycloak, Auth0, Entra ID...), when one is configured.

`INGOT_OIDC_ISSUER` names the issuer; its signing keys come from the JWKS its discovery document
names (`/.well-known/openid-configuration`), fetched once, kept, and fetched again when a token names
a key id not in them (a rotation), at most every `INGOT_OIDC_JWKS_COOLDOWN_SECONDS`. A token must be
signed with RS256 or ES256 by one of those keys (never `none`, never a shared secret: a token that
says HS256 is not the issuer's), name the issuer and `INGOT_OIDC_AUDIENCE`, and be unexpired. Its
scopes are the Ingot scopes (read, write, admin) found in `INGOT_OIDC_SCOPES_CLAIM`: a space-separated
string (`scope`) or a list, at a dotted path (`realm_access.roles`, as Keycloak puts realm roles).
"""

from __future__ import annotations

import functools
import json
import logging
import urllib.request
from dataclasses import dataclass

import jwt

from pipelines.auth.principal import SCOPES
from pipelines.core.settings import get_settings

log = logging.getLogger(__name__)
ALGORITHMS = ["RS256", "ES256"]


@dataclass(frozen=True)
class Identity:
    subject: str
    name: str
    scopes: list[str]
    expires: float  # epoch seconds


def configured() -> bool:
    return bool(get_settings().oidc_issuer)


def is_theirs(token: str) -> bool:
    """Whether TOKEN claims to be signed as the issuer signs (an asymmetric algorithm): the local
    tokens from /auth/login are HS256."""
    try:
        return jwt.get_unverified_header(token).get("alg") in ALGORITHMS
    except jwt.PyJWTError:
        return False


def verify(token: str) -> Identity | None:
    """The identity TOKEN proves, if the configured issuer signed it for this audience and it is
    still valid; None otherwise (its reason logged at debug: an attacker learns nothing)."""
    settings = get_settings()
    try:
        keys = _keys(settings.oidc_issuer.rstrip("/"), settings.oidc_jwks_cooldown_seconds)
        key = keys.get_signing_key_from_jwt(token)
        claims = jwt.decode(token, key.key, algorithms=ALGORITHMS, issuer=settings.oidc_issuer.rstrip("/"),
                            audience=settings.oidc_audience or None,
                            options={"require": ["exp", "iss", "sub"], "verify_aud": bool(settings.oidc_audience)})
    except (jwt.PyJWTError, OSError, ValueError) as exc:
        log.debug("an OIDC token was refused: %s", exc)
        return None
    granted = _claim(claims, settings.oidc_scopes_claim)
    held = granted.split() if isinstance(granted, str) else list(granted or [])
    scopes = sorted(set(held) & set(SCOPES))
    name = str(claims.get("preferred_username") or claims.get("email") or claims["sub"])
    return Identity(str(claims["sub"]), name, scopes, float(claims["exp"]))


def _claim(claims: dict, path: str):
    found: object = claims
    for part in path.split("."):
        found = found.get(part) if isinstance(found, dict) else None
    return found


@functools.lru_cache(maxsize=4)
def _keys(issuer: str, cooldown: float) -> jwt.PyJWKClient:
    """The issuer's key set client: its JWKS address read once from the discovery document."""
    with urllib.request.urlopen(f"{issuer}/.well-known/openid-configuration", timeout=10) as answer:  # noqa: S310
        discovery = json.load(answer)
    if discovery.get("issuer", "").rstrip("/") != issuer:
        raise ValueError(f"the discovery document names another issuer: {discovery.get('issuer')!r}")
    return jwt.PyJWKClient(discovery["jwks_uri"], cache_jwk_set=True, lifespan=3600, timeout=10,
                           cooldown_duration=cooldown)
