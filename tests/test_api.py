"""The HTTP contract without workers: envelope, request ids, authentication, errors."""

import httpx
import pytest

from testkit.datagen import sources_toml, write_csv
from tests.helpers import make_key


@pytest.fixture
def http(api_url):
    with httpx.Client(base_url=api_url) as c:
        yield c


@pytest.fixture
def declared(write_sources, data_dir):
    write_csv(data_dir / "a.csv", 5)
    write_sources(sources_toml("prices") + sources_toml("other", "other-*.csv"))


def test_health_ready_and_request_ids(http):
    assert http.get("/health").json()["status"] == "healthy"
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    r = http.get("/api/v1/health", headers={"X-Request-ID": "client-abc.1"})
    body = r.json()
    assert body["success"] is True and body["data"]["status"] == "healthy"
    assert body["request_id"] == "client-abc.1" == r.headers["x-request-id"]
    assert body["timestamp"].endswith("Z")
    r = http.get("/api/v1/health", headers={"X-Request-ID": "bad id with spaces"})
    assert r.headers["x-request-id"].startswith("req_")


def test_authentication_and_scopes(http, declared):
    r = http.get("/api/v1/jobs")
    assert r.status_code == 401 and r.json()["error"]["code"] == "AUTHENTICATION_ERROR"
    assert http.get("/api/v1/jobs", headers={"X-API-Key": "ingot_wrong"}).status_code == 401
    read = make_key(["read"])
    assert http.get("/api/v1/jobs", headers={"X-API-Key": read}).status_code == 200
    r = http.post("/api/v1/ingestion/start", headers={"X-API-Key": read}, json={})
    assert r.status_code == 403 and r.json()["error"]["code"] == "AUTHORIZATION_ERROR"
    bearer = http.get("/api/v1/jobs", headers={"Authorization": f"Bearer {read}"})
    assert bearer.status_code == 200


def test_keys_are_stored_only_as_hashes(admin_key, session):
    from sqlalchemy import text

    stored = session.execute(text("SELECT key_hash, prefix FROM api_keys")).all()
    assert stored and all(admin_key not in (h + p) for h, p in stored)


ERRORS = [  # (case, method, path, request arguments, status, code, what else the answer says)
    ("no such route", "GET", "/api/v1/nothing-here", {}, 404, "NOT_FOUND", lambda e: "detail" not in e),
    ("unknown source", "POST", "/api/v1/ingestion/start", {"json": {"sources": ["nope"]}}, 404, "NOT_FOUND",
     lambda e: e["error"]["details"] == {"sources": ["nope"]}),
    ("wrong type", "POST", "/api/v1/ingestion/start", {"json": {"sources": "prices"}}, 422, "VALIDATION_ERROR",
     lambda e: e["error"]["details"]["errors"][0]["field"] == "sources"),
    ("out of range", "POST", "/api/v1/ingestion/start", {"json": {"options": {"batch_size": 0}}}, 422,
     "VALIDATION_ERROR", lambda e: e["error"]["details"]["errors"][0]["field"] == "options.batch_size"),
    ("not JSON", "POST", "/api/v1/ingestion/start",
     {"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "VALIDATION_ERROR",
     lambda e: e["error"]["message"] == "request body is not valid JSON"),
    ("no such job", "GET", "/api/v1/jobs/job_missing", {}, 404, "NOT_FOUND",
     lambda e: e["error"]["message"] == "no job 'job_missing'"),
    ("limit too large", "GET", "/api/v1/jobs", {"params": {"limit": 10**9}}, 422, "VALIDATION_ERROR",
     lambda e: e["error"]["details"]["errors"][0]["field"] == "query.limit"),
    ("foreign cursor", "GET", "/api/v1/jobs", {"params": {"cursor": "garbage"}}, 422, "VALIDATION_ERROR",
     lambda e: e["error"]["message"] == "cursor is not valid"),
]


@pytest.mark.parametrize(("method", "path", "arguments", "status", "code", "check"), [c[1:] for c in ERRORS],
                         ids=[c[0] for c in ERRORS])
def test_errors_are_enveloped(http, admin_key, declared, method, path, arguments, status, code, check):
    arguments = {**arguments, "headers": {"X-API-Key": admin_key, **arguments.get("headers", {})}}
    r = http.request(method, path, **arguments)
    body = r.json()
    assert (r.status_code, body["success"], body["error"]["code"]) == (status, False, code), body
    assert body["request_id"] == r.headers["x-request-id"] and check(body), body


def test_a_second_start_for_a_busy_source_conflicts(http, admin_key, declared):
    headers = {"X-API-Key": admin_key}
    r = http.post("/api/v1/ingestion/start", headers=headers, json={"sources": ["prices"]})
    assert r.status_code == 202
    body = r.json()["data"]
    assert body["status"] == "queued" and body["sources"] == ["prices"] and body["job_id"].startswith("job_")
    r = http.post("/api/v1/ingestion/start", headers=headers, json={})
    assert r.status_code == 409 and r.json()["error"]["code"] == "CONFLICT"
    assert r.json()["error"]["details"] == {"sources": ["prices"]}
    r = http.post("/api/v1/ingestion/start", headers=headers, json={"sources": ["other"]})
    assert r.status_code == 202
    job = http.get(f"/api/v1/jobs/{body['job_id']}", headers=headers).json()["data"]
    assert job["state"] == "queued" and job["kind"] == "ingestion" and job["request_id"].startswith("req_")


def test_sources_listing_and_detail(http, admin_key, write_sources, data_dir):
    write_csv(data_dir / "a.csv", 3)
    write_sources(sources_toml("prices") + '\n[sources.broken]\ntype = "file"\n'
                  + '\n[sources.api]\ntype = "http"\nurl = "https://example.com"\n'
                  + 'headers = { "X-Api-Key" = "${EIA_KEY}", "Authorization" = "Bearer literal-secret" }\n')
    headers = {"X-API-Key": admin_key}
    listed = {s["id"]: s for s in http.get("/api/v1/sources", headers=headers).json()["data"]["sources"]}
    assert listed["prices"]["status"] == "never_run" and listed["prices"]["type"] == "file"
    assert listed["broken"]["status"] == "invalid"
    detail = http.get("/api/v1/sources/broken", headers=headers).json()["data"]
    assert "field 'path' is required" in detail["sync_stats"]["last_error"]
    detail = http.get("/api/v1/sources/api", headers=headers).json()["data"]
    assert detail["config"]["headers"] == {"X-Api-Key": "${EIA_KEY}", "Authorization": "<redacted>"}
    detail = http.get("/api/v1/sources/prices", headers=headers).json()["data"]
    assert detail["validation"]["primary_key"] == ["id"] and detail["sync_stats"]["total_records"] == 0
    assert http.get("/api/v1/sources/nope", headers=headers).status_code == 404


def test_oversized_bodies_are_refused_with_413(http, admin_key):
    r = http.post("/api/v1/ingestion/start", headers={"X-API-Key": admin_key, "Content-Type": "application/json"},
                  content=b'{"sources": ["' + b"x" * (1024 * 1024) + b'"]}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"


def test_rate_limit_headers_on_every_api_response(http, admin_key):
    r = http.get("/api/v1/jobs", headers={"X-API-Key": admin_key})
    assert r.headers["X-RateLimit-Limit"] == "1000"
    assert int(r.headers["X-RateLimit-Remaining"]) < 1000 and int(r.headers["X-RateLimit-Reset"]) > 0


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_documentation_loads_with_no_internet(http, page):
    import re

    html = http.get(page)
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    assets = re.findall(r'(?:src|href)=["\']([^"\']+)["\']', html.text)
    assert assets, html.text[:500]
    for asset in assets:
        assert asset.startswith("/"), f"{page} loads {asset} from elsewhere"  # nothing from a CDN
        assert http.get(asset).status_code == 200, asset
    openapi = re.search(r"""(?:url|spec-url)["']?\s*[:=]\s*['"]([^'"]+openapi\.json)""", html.text)
    assert openapi and http.get(openapi.group(1)).status_code == 200


def test_status_shows_the_servers_own_path_to_admins_only(http, admin_key):
    from pipelines.core.settings import get_settings

    def storage(key: str) -> dict:
        answer = http.get("/api/v1/status", headers={"X-API-Key": key})
        assert answer.status_code == 200, answer.text
        return answer.json()["data"]["storage"]

    assert storage(admin_key)["path"] == str(get_settings().home)
    shown = storage(make_key(["read"]))
    assert shown["path"] is None and str(get_settings().home) not in str(shown)
    assert shown["total_records"] == 0 and shown["total_records_exact"] is True


def test_a_source_urls_query_values_and_credentials_are_redacted(http, write_sources):
    from tests.fakeapi import http_source

    url = "https://feed:hunter22@api.example.com:8443/v1/prices?token=abc123secret&market=${MARKET}&empty="
    write_sources(http_source("feed", url))
    detail = http.get("/api/v1/sources/feed", headers={"X-API-Key": make_key(["read"])}).json()["data"]
    assert detail["config"]["url"] == \
        "https://api.example.com:8443/v1/prices?token=<redacted>&market=${MARKET}&empty=<redacted>"
    assert "abc123secret" not in str(detail) and "hunter22" not in str(detail)


def test_totals_are_counted_to_a_cap(session):
    from sqlalchemy import select

    from pipelines.core.models import Job
    from pipelines.core.pagination import capped_count
    from pipelines.jobs.machine import create_job

    for _ in range(5):
        create_job(session, kind="scenario_run", params={}, send=lambda *a, **k: None)
    session.commit()
    at_cap = capped_count(session, select(Job.id), cap=5)
    assert (at_cap.count, at_cap.exact) == (5, True)
    over = capped_count(session, select(Job.id), cap=3)
    assert (over.count, over.exact) == (3, False)
    exact = capped_count(session, select(Job.id).where(Job.kind == "scenario_run"), cap=10)
    assert (exact.count, exact.exact) == (5, True)


def test_a_logs_cursor_past_any_event_id_is_a_clear_422(api_url, admin_key):
    """Event ids are bigints: a larger cursor is refused as invalid input, not passed on to fail in SQL."""
    answer = httpx.get(f"{api_url}/api/v1/logs", params={"cursor": 1997705422888300922177255899136},
                       headers={"X-API-Key": admin_key})
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "VALIDATION_ERROR"
