"""Users and bearer tokens: scrypt-hashed passwords, short-lived JWTs, scopes, a login rate limit."""

import logging
import time

import httpx
import jwt
from sqlalchemy import text

from pipelines.core.db import get_engine
from pipelines.core.settings import get_settings
from tests.helpers import wait_for
from tests.test_cli import ingot

PASSWORD = "correct horse battery staple"


def login(http, username, password) -> httpx.Response:
    return http.post("/api/v1/auth/login", json={"username": username, "password": password})


def test_users_log_in_for_tokens_that_carry_their_scopes(api_url, write_sources):
    made = ingot("users", "create", "ana", "--scopes", "read", "--password-stdin", input_text=PASSWORD + "\n")
    assert made.returncode == 0, made.stderr
    assert ingot("users", "create", "ana", "--password-stdin", input_text=PASSWORD + "\n").returncode == 2
    assert ingot("users", "create", "bo", "--password-stdin", input_text="short\n").returncode == 2
    with get_engine().connect() as conn:
        stored = conn.execute(text("SELECT password_hash FROM users WHERE username = 'ana'")).scalar_one()
    assert stored.startswith("scrypt$") and PASSWORD not in stored
    with httpx.Client(base_url=api_url) as http:
        r = login(http, "ana", PASSWORD)
        assert r.status_code == 200
        body = r.json()["data"]
        assert body["token_type"] == "bearer" and body["expires_in"] == get_settings().jwt_expiry_seconds
        bearer = {"Authorization": f"Bearer {body['access_token']}"}
        assert http.get("/api/v1/jobs", headers=bearer).status_code == 200
        r = http.post("/api/v1/ingestion/start", headers=bearer, json={})
        assert r.status_code == 403  # a read user
        assert login(http, "ana", "wrong password!").status_code == 401
        assert login(http, "nobody", PASSWORD).status_code == 401
        tampered = body["access_token"][:-4] + ("AAAA" if not body["access_token"].endswith("AAAA") else "BBBB")
        assert http.get("/api/v1/jobs", headers={"Authorization": f"Bearer {tampered}"}).status_code == 401
        claims = jwt.decode(body["access_token"], options={"verify_signature": False})
        expired = jwt.encode({**claims, "exp": int(time.time()) - 10}, get_settings().jwt_key(), algorithm="HS256")
        r = http.get("/api/v1/jobs", headers={"Authorization": f"Bearer {expired}"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "AUTHENTICATION_ERROR"
        not_ours = "a-secret-that-is-not-ours-but-long-enough-0123"
        forged = jwt.encode({**claims, "scopes": ["admin"]}, not_ours, algorithm="HS256")
        assert http.get("/api/v1/jobs", headers={"Authorization": f"Bearer {forged}"}).status_code == 401


def test_login_is_rate_limited_per_address(api_url):
    with httpx.Client(base_url=api_url) as http:
        codes = []
        for attempt in range(2 * get_settings().login_rate_limit_per_minute + 1):
            r = login(http, f"nobody-{attempt}", "x")  # a new account each time: the address is what is limited
            codes.append(r.status_code)
            if r.status_code == 429:
                break
    assert codes[-1] == 429 and set(codes[:-1]) == {401}
    assert r.headers["X-RateLimit-Limit"] == str(get_settings().login_rate_limit_per_minute)


def test_me_names_the_caller_and_its_scopes(api_url, write_sources, caplog):
    import subprocess
    import sys

    from tests.helpers import ROOT, make_key

    key = make_key(["write"])
    answer = httpx.get(f"{api_url}/api/v1/auth/me", headers={"X-API-Key": key}).json()["data"]
    assert answer["kind"] == "key" and answer["id"].startswith("key_") and answer["scopes"] == ["write"]
    made = subprocess.run([sys.executable, "-m", "cli.main", "users", "create", "ana", "--scopes", "read",
                           "--password-stdin"], cwd=ROOT, input="a long enough password\n", capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    token = httpx.post(f"{api_url}/api/v1/auth/login",
                       json={"username": "ana", "password": "a long enough password"}).json()["data"]["access_token"]
    with caplog.at_level(logging.INFO, logger="ingot.access"):
        answer = httpx.get(f"{api_url}/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    user = answer.json()["data"]
    assert (user["kind"], user["name"], user["scopes"]) == ("user", "ana", ["read"])
    line = wait_for(lambda: [r for r in caplog.records if r.name == "ingot.access"
                             and r.request_id == answer.headers["x-request-id"]], timeout=5)
    assert line[0].principal == user["id"]  # the user, named in the access line
    assert httpx.get(f"{api_url}/api/v1/auth/me").status_code == 401


def test_each_request_leaves_one_access_line(api_url, admin_key, caplog):
    caplog.set_level(logging.INFO, logger="ingot.access")
    answer = httpx.get(f"{api_url}/api/v1/jobs/job_missing?secret=1", headers={"X-API-Key": admin_key})
    lines = [r for r in caplog.records if r.name == "ingot.access" and r.request_id == answer.headers["x-request-id"]]
    assert len(lines) == 1
    line = lines[0]
    assert (line.method, line.route, line.status) == ("GET", "/api/v1/jobs/{job_id}", 404)
    assert line.principal.startswith("key_") and line.duration_ms >= 0 and "secret" not in line.getMessage()
