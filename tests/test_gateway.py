"""The gateway under load and at its edges: admission (answers, never silence; /health never waits),
runtime settings that never block a request, per-key limits, the limit shared across API processes,
CORS, key-labelled metrics, 405 with Allow, NUL characters, types as JSON means them."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest
import uvicorn

from api.main import create_app
from pipelines.core.db import session_scope
from pipelines.jobs import machine
from tests.helpers import api_processes, free_port, make_key, wait_for


def _serve(app, root_path: str = "") -> tuple[str, uvicorn.Server]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", root_path=root_path))
    threading.Thread(target=server.run, daemon=True).start()
    wait_for(lambda: server.started, message="the API")
    return f"http://127.0.0.1:{port}", server


@pytest.fixture
def small_api(configure):
    """An API that lets one request in at a time and keeps others waiting at most 0.3 s."""
    configure(api_concurrency=1, api_queue_seconds=0.3)
    url, server = _serve(create_app())
    configure.undo()
    yield url
    server.should_exit = True


def _libpq() -> str:
    return os.environ["INGOT_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://", 1)


def test_at_capacity_the_api_answers_503_at_once_and_health_never_waits(small_api):
    key = make_key(["read"])
    with psycopg.connect(_libpq()) as locker:
        locker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")  # the next job read waits on this
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(httpx.get, f"{small_api}/api/v1/jobs", headers={"X-API-Key": key}, timeout=60)
            wait_for(lambda: _waiting_on_lock(), message="a request waiting on the lock")
            began = time.monotonic()
            turned_away = httpx.get(f"{small_api}/api/v1/jobs", headers={"X-API-Key": key}, timeout=10)
            assert turned_away.status_code == 503 and time.monotonic() - began < 5
            assert turned_away.headers["retry-after"] == "1"
            assert turned_away.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
            began = time.monotonic()
            assert httpx.get(f"{small_api}/health", timeout=5).status_code == 200
            assert time.monotonic() - began < 1
            locker.rollback()  # the lock goes; the request that waited is answered
            assert stuck.result(30).status_code == 200


def test_heavy_reads_wait_in_their_own_lane_and_leave_the_other_places_free(configure):
    """Two places, one of them for heavy reads: a data query stuck in the database holds the heavy lane,
    a second one waits for it and is turned away, and a listing still goes through at once."""
    configure(api_concurrency=2, api_heavy_concurrency=1, api_queue_seconds=0.3)
    url, server = _serve(create_app())
    configure.undo()
    headers = {"X-API-Key": make_key(["read"])}
    try:
        with psycopg.connect(_libpq()) as locker, ThreadPoolExecutor(1) as pool:
            locker.execute("LOCK TABLE observations IN ACCESS EXCLUSIVE MODE")
            stuck = pool.submit(httpx.post, f"{url}/api/v1/data/query", json={}, headers=headers, timeout=60)
            wait_for(lambda: _waiting_on_lock("observations"), message="a data query waiting on the lock")
            second = httpx.post(f"{url}/api/v1/data/query", json={}, headers=headers, timeout=10)
            assert second.status_code == 503 and second.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
            began = time.monotonic()
            assert httpx.get(f"{url}/api/v1/jobs", headers=headers, timeout=10).status_code == 200
            assert time.monotonic() - began < 1
            locker.rollback()
            assert stuck.result(30).status_code == 200
    finally:
        server.should_exit = True


def _waiting_on_lock(table: str = "jobs") -> bool:
    with psycopg.connect(_libpq()) as conn:  # a fresh connection: pg_stat_activity is a per-transaction snapshot
        return bool(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                 "AND query LIKE %s", (f"%FROM {table}%",)).fetchone()[0])


def test_a_stale_runtime_read_never_waits_for_another_thread():
    from pipelines.core import runtime

    runtime.refresh()
    runtime._cache["at"] = 0.0  # stale
    with runtime._lock:  # another thread is re-reading (and, say, waiting for a connection)
        began = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(runtime.value, "rate_limit_per_minute").result(5) >= 1
        assert time.monotonic() - began < 1


def test_a_key_can_carry_its_own_rate_limit(api_url):
    admin = make_key(["admin"])
    with httpx.Client(base_url=f"{api_url}/api/v1") as http:
        created = http.post("/keys", headers={"X-API-Key": admin},
                            json={"name": "tier", "scopes": ["read"], "rate_limit_per_minute": 3}).json()["data"]
        assert created["rate_limit_per_minute"] == 3
        answers = [http.get("/jobs", headers={"X-API-Key": created["key"]}) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit"] == "3" and "retry-after" in answers[3].headers


def test_a_request_no_route_answers_counts_against_its_key(api_url):
    """Paths and methods with no route are counted in the caller's own bucket: they cannot be used to
    probe the API beyond the key's limit, and they do not spend the address's."""
    admin = make_key(["admin"])
    with httpx.Client(base_url=f"{api_url}/api/v1") as http:
        key = http.post("/keys", headers={"X-API-Key": admin},
                        json={"name": "probe", "scopes": ["read"], "rate_limit_per_minute": 3}).json()["data"]["key"]
        answers = [http.get("/jobs", headers={"X-API-Key": key}), http.get("/nothing-here", headers={"X-API-Key": key}),
                   http.delete("/jobs", headers={"X-API-Key": key}), http.get("/jobs", headers={"X-API-Key": key})]
    assert [r.status_code for r in answers] == [200, 404, 405, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in answers] == ["2", "1", "0", "0"]


def test_behind_a_proxys_root_path_every_request_is_still_identified_and_counted(admin_key):
    url, server = _serve(create_app(), root_path="/ingot")
    try:
        with httpx.Client(base_url=url) as http:  # the proxy took /ingot off; the app is told it was there
            served = http.get("/api/v1/jobs", headers={"X-API-Key": admin_key})
            refused = http.get("/api/v1/jobs")
            health = http.get("/health")
    finally:
        server.should_exit = True
    assert served.status_code == 200 and "X-RateLimit-Remaining" in served.headers
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "AUTHENTICATION_ERROR"
    assert health.status_code == 200


def test_the_rate_limit_holds_across_two_api_processes(configure, tmp_path):
    """1,000 + 50 requests from one key, spread over two API processes: exactly 50 are 429 (a bucket of
    1,000 that refills one a minute: none comes back while the requests go out)."""
    key = make_key(["read"])
    with api_processes(2, INGOT_RATE_LIMIT_PER_MINUTE="1", INGOT_RATE_LIMIT_BURST="1000") as urls:

        def burst(url: str) -> list[httpx.Response]:
            with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=30) as http:
                return [http.get("/api/v1/health") for _ in range(525)]

        with ThreadPoolExecutor(2) as pool:
            answers = [r for batch in pool.map(burst, urls) for r in batch]
        refused = [r for r in answers if r.status_code == 429]
        assert len(refused) == 50 and len(answers) - len(refused) == 1000
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        # A random key header does not buy a fresh bucket: it counts against the address.
        assert httpx.get(f"{urls[0]}/api/v1/jobs", headers={"X-API-Key": "ingot_made_up"}).status_code == 401


def test_cors_is_off_by_default_and_follows_configuration(api_url, configure):
    preflight = {"Origin": "https://desk.example", "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "X-API-Key"}
    assert "access-control-allow-origin" not in httpx.options(f"{api_url}/api/v1/jobs", headers=preflight).headers
    configure(cors_origins="https://desk.example")
    url, server = _serve(create_app())
    try:
        answer = httpx.options(f"{url}/api/v1/jobs", headers=preflight)
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://desk.example"
        other = httpx.options(f"{url}/api/v1/jobs", headers={**preflight, "Origin": "https://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
    finally:
        server.should_exit = True


def test_request_metrics_are_labelled_by_key_only_when_asked(api_url, configure):
    key = make_key(["read"])
    key_id = httpx.get(f"{api_url}/api/v1/auth/me", headers={"X-API-Key": key}).json()["data"]["id"]
    assert key_id not in httpx.get(f"{api_url}/metrics").text  # off by default
    configure(metrics_key_labels="true")
    url, server = _serve(create_app())
    try:
        httpx.get(f"{url}/api/v1/jobs", headers={"X-API-Key": key})
        text = httpx.get(f"{url}/metrics").text
        assert f'key_id="{key_id}"' in text and "ingot_http_requests_by_key_total" in text
    finally:
        server.should_exit = True


def test_request_metrics_are_labelled_by_route_template_never_by_path(api_url, admin_key):
    with httpx.Client(base_url=api_url, headers={"X-API-Key": admin_key}) as http:
        answers = [http.get(p).status_code for p in ("/api/v1/jobs/job_one_of_many", "/api/v1/no/such/route", "/docs")]
        assert answers == [404, 404, 200]
        text = http.get("/metrics").text
    for route in ("/api/v1/jobs/{job_id}", "unmatched", "/docs"):
        assert f'ingot_http_requests_total{{method="GET",route="{route}"' in text, route
    assert "job_one_of_many" not in text and "/no/such" not in text


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("DELETE", "/api/v1/config", "GET, HEAD, PUT"),
    ("PUT", "/api/v1/keys", "GET, HEAD, POST"),
    ("PATCH", "/api/v1/scenarios/scn_x", "DELETE, GET, HEAD"),
    ("GET", "/api/v1/ingestion/start", "POST"),
    ("HEAD", "/api/v1/ingestion/start", "POST"),
])
def test_a_method_a_path_lacks_is_405_naming_every_method_it_has(api_url, method, path, allow):
    answer = httpx.request(method, f"{api_url}{path}", headers={"X-API-Key": make_key(["admin"])})
    assert answer.status_code == 405 and answer.headers["allow"] == allow
    if method != "HEAD":
        assert answer.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


def test_head_of_a_large_file_stops_its_sending_at_once(tmp_path):
    """A HEAD on a download must not read the file through: the route is told its client has gone as
    soon as the headers are out (Starlette's FileResponse, 64 KiB a message, as an export's download)."""
    import asyncio

    from starlette.responses import FileResponse

    from api.head import Head

    big = tmp_path / "big.csv"
    big.write_bytes(b"x" * (50 << 20))
    produced: list[dict] = []

    async def route(scope, receive, send):
        async def counted(message):
            produced.append(message)
            await send(message)

        await FileResponse(big)(scope, receive, counted)

    async def client_stays():  # the request's (empty) body, then a connection that stays open
        if not produced:
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()

    sent: list[dict] = []

    async def head():
        scope = {"type": "http", "method": "HEAD", "path": "/x", "headers": [], "asgi": {"spec_version": "2.3"}}

        async def out(message):
            sent.append(message)

        await asyncio.wait_for(Head(route)(scope, client_stays, out), timeout=30)

    asyncio.run(head())
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert dict(sent[0]["headers"])[b"content-length"] == str(50 << 20).encode()
    assert len(produced) < 20  # not the file's 800 messages


def test_head_answers_every_get_route_with_its_headers_and_no_body(api_url, admin_key):
    """RFC 9110 asks every server for HEAD: a load balancer's probe, `curl -I`. Each answers as its GET
    would, headers and all, without the body; the access line and metrics say HEAD."""
    key = {"X-API-Key": admin_key}
    with httpx.Client(base_url=api_url, timeout=10) as http:
        for path, headers in (("/health", {}), ("/api/v1/health", {}), ("/api/v1/jobs", key),
                              ("/api/v1/sources", key), ("/metrics", {})):
            got, head = http.get(path, headers=headers), http.head(path, headers=headers)
            assert head.status_code == got.status_code == 200, path
            assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"], path
            if path.startswith("/api/v1/"):
                assert head.headers["x-request-id"] and head.headers["x-ratelimit-limit"], path
        refused = http.head("/api/v1/jobs")  # no key: the same 401, headers only
        assert refused.status_code == 401 and refused.content == b""
        assert http.head("/api/v1/jobs/job_0123456789abcdef01234567", headers=key).status_code == 404
        # A stream's HEAD ends at once, the stream with it: it does not run on for nobody.
        with session_scope() as session:  # queued, with no worker: its stream would run on
            job_id = machine.create_job(session, kind="ingestion", params={"sources": []}, send=lambda job: None).id
        began = time.monotonic()
        events = http.head(f"/api/v1/jobs/{job_id}/events", headers=key)
        assert events.status_code == 200 and events.headers["content-type"].startswith("text/event-stream")
        assert time.monotonic() - began < 5
        text = http.get("/metrics").text
    assert 'ingot_http_requests_total{method="HEAD",route="/api/v1/jobs"' in text


@pytest.mark.parametrize(("method", "path", "arguments"), [
    ("GET", "/api/v1/ingestion/quarantine", {"params": {"source": "a\x00b"}}),
    ("GET", "/api/v1/jobs/job%00x", {}),
    ("POST", "/api/v1/webhooks", {"json": {"url": "https://example.com/\x00", "events": ["job.cancelled"]}}),
])
def test_a_nul_character_anywhere_is_422_not_500(api_url, method, path, arguments):
    answer = httpx.request(method, f"{api_url}{path}", headers={"X-API-Key": make_key(["admin"])}, **arguments)
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "VALIDATION_ERROR"


@pytest.mark.parametrize(("method", "path", "body", "params"), [
    ("POST", "/api/v1/ingestion/start", {"options": {"timeout": True}}, None),
    ("POST", "/api/v1/ingestion/start", {"options": {"timeout": "60"}}, None),
    ("POST", "/api/v1/ingestion/start", {"options": {"batch_size": 2.5}}, None),
    ("GET", "/api/v1/logs", None, {"start_time": "0.5"}),
    ("GET", "/api/v1/curves", None, {"asof_date": "1"}),
    ("PUT", "/api/v1/config", {"rate_limit_per_minute": True}, None),
    ("PUT", "/api/v1/config", {"webhook_retry_schedule": "soon"}, None),
    ("POST", "/api/v1/keys/key_x/rotate", {"grace_hours": False}, None),
])
def test_values_are_taken_as_json_types_them(api_url, method, path, body, params):
    answer = httpx.request(method, f"{api_url}{path}", headers={"X-API-Key": make_key(["admin"])}, json=body,
                           params=params)
    assert answer.status_code == 422, answer.text


def test_an_integral_number_is_an_integer(api_url, write_sources):
    write_sources('[sources.s]\ntype = "file"\nformat = "csv"\npath = "nothing/*.csv"\nprimary_key = ["id"]\n')
    answer = httpx.post(f"{api_url}/api/v1/ingestion/start", headers={"X-API-Key": make_key(["write"])},
                        json={"sources": ["s"], "options": {"timeout": 60.0}})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["data"]["job_id"]
    httpx.post(f"{api_url}/api/v1/jobs/{job_id}/cancel", headers={"X-API-Key": make_key(["write"])})
