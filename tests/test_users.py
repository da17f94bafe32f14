"""People, not only keys: admins create, list and disable users over HTTP; a token is refreshed, and
logged out everywhere at once (two API processes); a disabled user's token stops at its next request."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import api_processes, make_key

PASSWORD = "a long enough password"


@pytest.fixture
def admin(api_url):
    with httpx.Client(base_url=api_url, headers={"X-API-Key": make_key(["admin"])}, timeout=30) as http:
        yield http


def log_in(url: str, username: str, password: str = PASSWORD) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/auth/login", json={"username": username, "password": password}, timeout=30)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_admins_create_list_and_disable_users_and_never_see_a_password(api_url, admin):
    made = admin.post("/api/v1/users", json={"username": "ada", "password": PASSWORD, "scopes": ["read", "write"]})
    assert made.status_code == 201, made.text
    user = made.json()["data"]
    assert set(user) == {"id", "username", "scopes", "created_at", "disabled_at"}
    assert user["username"] == "ada" and user["scopes"] == ["read", "write"] and user["disabled_at"] is None
    assert PASSWORD not in made.text
    again = admin.post("/api/v1/users", json={"username": "ada", "password": PASSWORD, "scopes": ["read"]})
    assert again.status_code == 409 and again.json()["error"]["code"] == "CONFLICT"
    short = admin.post("/api/v1/users", json={"username": "bob", "password": "short", "scopes": ["read"]})
    assert short.status_code == 422
    listed = admin.get("/api/v1/users")
    assert [u["username"] for u in listed.json()["data"]["users"]] == ["ada"] and PASSWORD not in listed.text
    reader = httpx.get(f"{api_url}/api/v1/users", headers={"X-API-Key": make_key(["write"])})
    assert reader.status_code == 403

    token = log_in(api_url, "ada").json()["data"]["access_token"]
    assert httpx.get(f"{api_url}/api/v1/jobs", headers=bearer(token)).status_code == 200
    disabled = admin.post(f"/api/v1/users/{user['id']}/disable")
    assert disabled.status_code == 200 and disabled.json()["data"]["disabled_at"] is not None
    assert httpx.get(f"{api_url}/api/v1/jobs", headers=bearer(token)).status_code == 401  # its next request
    assert log_in(api_url, "ada").status_code == 401
    assert admin.post("/api/v1/users/usr_missing/disable").status_code == 404


def test_a_token_is_refreshed_and_logged_out_in_every_api_process(api_url, admin):
    admin.post("/api/v1/users", json={"username": "grace", "password": PASSWORD, "scopes": ["read"]})
    with api_processes(2) as (first, second):
        token = log_in(first, "grace").json()["data"]["access_token"]
        fresh = httpx.post(f"{first}/api/v1/auth/refresh", headers=bearer(token))
        assert fresh.status_code == 200, fresh.text
        renewed = fresh.json()["data"]
        assert renewed["token_type"] == "bearer" and renewed["expires_in"] > 0 and renewed["access_token"] != token
        for url in (first, second):
            assert httpx.get(f"{url}/api/v1/jobs", headers=bearer(token)).status_code == 200
        out = httpx.post(f"{second}/api/v1/auth/logout", headers=bearer(token))
        assert out.status_code == 200 and out.json()["data"] == {"logged_out": True}
        for url in (first, second):  # refused by every process from now on...
            refused = httpx.get(f"{url}/api/v1/jobs", headers=bearer(token))
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "AUTHENTICATION_ERROR"
            assert httpx.post(f"{url}/api/v1/auth/refresh", headers=bearer(token)).status_code == 401
            # ...while the token refreshed from it lives on
            assert httpx.get(f"{url}/api/v1/jobs", headers=bearer(renewed["access_token"])).status_code == 200
        key = make_key(["read"])
        by_key = httpx.post(f"{first}/api/v1/auth/logout", headers={"X-API-Key": key})
        assert by_key.status_code == 401  # a key is revoked with DELETE /keys/{id}, not logged out
        assert httpx.get(f"{first}/api/v1/jobs", headers={"X-API-Key": key}).status_code == 200
