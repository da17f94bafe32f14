"""API keys over HTTP (admin): created with an expiry, listed without secrets, revoked at once,
rotated with a grace period."""

import datetime as dt

import httpx
import pytest

from tests.helpers import api_processes, make_key, wait_for


@pytest.fixture
def admin(api_url, admin_key):
    with httpx.Client(base_url=f"{api_url}/api/v1", headers={"X-API-Key": admin_key}) as http:
        yield http


def works(api_url: str, key: str) -> int:
    return httpx.get(f"{api_url}/api/v1/jobs", headers={"X-API-Key": key}).status_code


def test_create_list_revoke(api_url, admin):
    made = admin.post("/keys", json={"name": "ci", "scopes": ["read"]})
    assert made.status_code == 201
    key = made.json()["data"]
    assert key["key"].startswith("ingot_") and key["prefix"] == key["key"][:12]
    assert works(api_url, key["key"]) == 200
    listed = admin.get("/keys").json()["data"]["keys"]
    assert key["id"] in [k["id"] for k in listed] and all("key" not in k for k in listed)
    assert key["key"] not in admin.get("/keys").text  # never shown again
    assert admin.delete(f"/keys/{key['id']}").json()["data"]["revoked_at"]
    assert works(api_url, key["key"]) == 401  # the very next request
    assert admin.delete("/keys/key_missing").status_code == 404


def test_an_expired_key_is_refused(api_url, admin):
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)).isoformat()
    key = admin.post("/keys", json={"name": "brief", "scopes": ["read"], "expires_at": soon}).json()["data"]
    assert works(api_url, key["key"]) == 200
    wait_for(lambda: works(api_url, key["key"]) == 401, timeout=15, interval=0.5, message="the key to expire")
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    assert admin.post("/keys", json={"name": "x", "scopes": ["read"], "expires_at": past}).status_code == 422


def test_rotation_keeps_the_old_secret_for_its_grace_period(api_url, admin):
    key = admin.post("/keys", json={"name": "svc", "scopes": ["read"]}).json()["data"]
    rotated = admin.post(f"/keys/{key['id']}/rotate", json={"grace_hours": 1}).json()["data"]
    assert rotated["id"] == key["id"] and rotated["key"] != key["key"]
    assert works(api_url, rotated["key"]) == 200 and works(api_url, key["key"]) == 200  # both, for an hour
    again = admin.post(f"/keys/{key['id']}/rotate", json={"grace_hours": 0}).json()["data"]
    assert works(api_url, again["key"]) == 200
    assert works(api_url, rotated["key"]) == 401 and works(api_url, key["key"]) == 401


@pytest.mark.parametrize("scopes", [["read"], ["write"]])
def test_only_admins_manage_keys(api_url, scopes):
    with httpx.Client(base_url=f"{api_url}/api/v1", headers={"X-API-Key": make_key(scopes)}) as http:
        assert http.get("/keys").status_code == 403
        assert http.post("/keys", json={"name": "x", "scopes": ["admin"]}).status_code == 403


def test_last_use_is_written_at_most_once_a_minute(api_url, admin):
    from sqlalchemy import text

    from pipelines.core.db import get_engine

    key = admin.post("/keys", json={"name": "busy", "scopes": ["read"]}).json()["data"]

    def last_used():
        with get_engine().connect() as conn:
            return conn.execute(text("SELECT last_used_at FROM api_keys WHERE id = :i"), {"i": key["id"]}).scalar_one()

    from tests.helpers import wait_for

    assert works(api_url, key["key"]) == 200
    # The request's transaction commits as the request ends, which may be just after its answer.
    first = wait_for(last_used, timeout=10, message="the first use to be recorded")
    for _ in range(5):
        assert works(api_url, key["key"]) == 200
    assert last_used() == first  # five more requests, no more writes


def test_the_cli_manages_keys_through_the_api_when_given_an_admin_key(api_url, admin):
    import subprocess
    import sys

    from tests.helpers import ROOT, make_key

    def ingot(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.main", "keys", *args, "--url", api_url,
                               "--api-key", make_key(["admin"])], cwd=ROOT, capture_output=True, text=True, timeout=60)

    made = ingot("create", "--name", "over-http", "--scopes", "read", "--rate-limit", "50")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert works(api_url, secret) == 200
    listed = admin.get("/keys").json()["data"]["keys"]
    mine = next(k for k in listed if k["name"] == "over-http")
    assert mine["rate_limit_per_minute"] == 50
    assert "over-http" in ingot("list").stdout
    rotated = ingot("rotate", mine["id"], "--grace-hours", "0")
    assert rotated.returncode == 0 and rotated.stdout.strip() != secret
    assert works(api_url, rotated.stdout.strip()) == 200 and works(api_url, secret) == 401
    assert ingot("revoke", mine["id"]).returncode == 0
    assert works(api_url, rotated.stdout.strip()) == 401
    refused = subprocess.run([sys.executable, "-m", "cli.main", "keys", "list", "--url", api_url, "--api-key",
                              make_key(["read"])], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "AUTHORIZATION_ERROR" in refused.stderr


@pytest.fixture
def two_apis():
    """Two API processes on the same database and Redis, as a deployment scales them."""
    with api_processes(2) as urls:
        yield urls


def test_a_key_revoked_in_one_api_process_is_refused_by_another_at_its_next_request(two_apis, admin_key):
    """Each process keeps the keys it has checked: a revocation or rotation made through another
    process reaches it at once, not when its copy would be checked again."""
    one, other = two_apis
    with httpx.Client(base_url=f"{one}/api/v1", headers={"X-API-Key": admin_key}) as admin:
        key = admin.post("/keys", json={"name": "ci", "scopes": ["read"]}).json()["data"]
        rotating = admin.post("/keys", json={"name": "svc", "scopes": ["read"]}).json()["data"]
        for _ in range(3):  # checked once, then known to the other process
            assert works(other, key["key"]) == 200 and works(other, rotating["key"]) == 200
        assert admin.delete(f"/keys/{key['id']}").status_code == 200
        assert works(other, key["key"]) == 401
        rotated = admin.post(f"/keys/{rotating['id']}/rotate", json={"grace_hours": 0}).json()["data"]
        assert works(other, rotating["key"]) == 401 and works(other, rotated["key"]) == 200


def test_with_redis_away_keys_are_checked_in_the_database(api_url, admin_key, embedded_redis):
    """The revocation could not be announced (Redis is down), so nothing cached is trusted."""
    from pipelines.auth import keys
    from pipelines.core.db import session_scope

    with httpx.Client(base_url=f"{api_url}/api/v1", headers={"X-API-Key": admin_key}) as admin:
        key = admin.post("/keys", json={"name": "ci", "scopes": ["read"]}).json()["data"]
    assert works(api_url, key["key"]) == 200 and works(api_url, key["key"]) == 200  # cached
    embedded_redis.stop()
    try:
        with session_scope() as session:
            keys.revoke(session, key["id"])
        assert works(api_url, key["key"]) == 401
        assert works(api_url, admin_key) == 200  # the rest go on, unlimited rather than refused
    finally:
        embedded_redis.start()
    wait_for(lambda: works(api_url, admin_key) == 200 and works(api_url, key["key"]) == 401, timeout=20,
             message="the API to use Redis again")
