"""Every operation of the OpenAPI document, with every kind of credential, answered as api.md says.

The operations come from the document the API serves, so a route added tomorrow is in the matrix
without anyone writing it down; the scope each needs comes from api.md's rules, written here once.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import httpx
import jwt
import pytest

from tests.helpers import make_key, wait_for

OPEN = {("GET", "/api/v1/health"), ("POST", "/api/v1/auth/login")}


def required_scope(method: str, path: str) -> str | None:
    """api.md: read for GET and POST /data/query; a valid bearer token for refreshing or ending it; write for starting
    and stopping work; admin for config, keys, users, logs and setting a scenario run's state. None for
    the open routes."""
    if (method, path) in OPEN:
        return None
    if path.startswith(("/api/v1/keys", "/api/v1/users", "/api/v1/config", "/api/v1/logs")) or path.endswith("/state"):
        return "admin"
    if path in ("/api/v1/auth/refresh", "/api/v1/auth/logout"):
        return "bearer"  # a valid token from login, alone: none of the credentials here is one
    if method == "GET" or path == "/api/v1/data/query":
        return "read"
    return "write"


RANK = {"read": 1, "write": 2, "admin": 3}


@pytest.fixture
def credentials(api_url) -> dict[str, dict[str, str]]:
    from pipelines.auth import keys, users
    from pipelines.core.db import session_scope
    from pipelines.core.settings import get_settings

    with session_scope() as session:
        expires = datetime.now(UTC) + timedelta(seconds=0.3)  # expired by the time the test begins
        _row, expiring = keys.create_key(session, "expiring", ["admin"], expires)
        revoked_row, revoked = keys.create_key(session, "revoked", ["admin"])
        keys.revoke(session, revoked_row.id)
        user = users.create_user(session, f"matrix_{time.time_ns()}", "a long password", ["admin"])
    now = int(time.time())
    claims = {"sub": user.id, "name": user.username, "scopes": ["admin"], "iat": now - 7200, "exp": now - 3600,
              "iss": "ingot"}
    expired_token = jwt.encode(claims, get_settings().jwt_key(), algorithm="HS256")
    good_token = jwt.encode({**claims, "exp": now + 3600}, get_settings().jwt_key(), algorithm="HS256")
    head, body, signature = good_token.split(".")
    tampered = f"{head}.{body}.{signature[:-4]}{'AAAA' if not signature.endswith('AAAA') else 'BBBB'}"
    wait_for(lambda: datetime.now(UTC) > expires, timeout=5, message="the key's expiry")
    return {
        "none": {},
        "read": {"X-API-Key": make_key(["read"])},
        "write": {"X-API-Key": make_key(["write"])},
        "admin": {"X-API-Key": make_key(["admin"])},
        "revoked key": {"X-API-Key": revoked},
        "expired key": {"X-API-Key": expiring},
        "expired token": {"Authorization": f"Bearer {expired_token}"},
        "tampered token": {"Authorization": f"Bearer {tampered}"},
    }


def operations(api_url: str) -> list[tuple[str, str]]:
    document = httpx.get(f"{api_url}/openapi.json").json()
    return sorted((method.upper(), path) for path, ops in document["paths"].items() for method in ops
                  if path.startswith(("/api/v1/", "/v1/")))  # seed 000's paths are gated alike


def test_the_matrix_covers_every_operation(api_url):
    found = operations(api_url)
    assert len(found) >= 45  # the document really was read
    assert {(m, p) for m, p in found if required_scope(m, p) == "admin"} >= {
        ("GET", "/api/v1/keys"), ("PUT", "/api/v1/config"), ("GET", "/api/v1/logs"),
        ("POST", "/api/v1/scenarios/runs/{run_id}/state")}


def test_the_document_declares_both_credentials_and_which_operations_need_one(api_url):
    """Swagger's Authorize and generated clients know only what the document declares: both schemes,
    and on each operation either one (a list of alternatives), or nothing on the open routes."""
    document = httpx.get(f"{api_url}/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["BearerToken"]["type"] == "http" and schemes["BearerToken"]["scheme"] == "bearer"
    for method, path in operations(api_url):
        declared = document["paths"][path][method.lower()].get("security")
        if required_scope(method, path) is None:
            assert not declared, f"{method} {path} is open but declares {declared}"
        elif required_scope(method, path) == "bearer":
            assert declared == [{"BearerToken": []}], f"{method} {path}: {declared}"
        else:
            assert declared == [{"ApiKey": []}, {"BearerToken": []}], f"{method} {path}: {declared}"


@pytest.mark.parametrize("who", ["none", "read", "write", "admin", "revoked key", "expired key", "expired token",
                                 "tampered token"])
def test_every_operation_answers_each_credential_as_the_contract_says(api_url, credentials, who):
    wrong = []
    with httpx.Client(base_url=api_url, timeout=30) as http:
        for method, path in operations(api_url):
            concrete = re.sub(r"\{[^}]+\}", "x_missing", path)
            arguments = {"json": {}} if method in ("POST", "PUT") and not path.endswith("/login") else {}
            status = http.request(method, concrete, headers=credentials[who], **arguments).status_code
            needed = required_scope(method, path)
            if needed is None:
                expected_ok = status not in (401, 403)
            elif needed == "bearer":
                expected_ok = status == 401
            elif who in RANK:
                expected_ok = status == 403 if RANK[who] < RANK[needed] else status not in (401, 403)
            else:  # no credentials, or credentials that are no longer (or never were) good
                expected_ok = status == 401
            if not expected_ok or status >= 500:
                wrong.append(f"{method} {path}: {status}")
    assert not wrong, f"{who}: " + "; ".join(wrong)
