"""The Python client: every operation of the API reachable through it, 429 and 503 tried again after
the `Retry-After` the server gave, errors raised with the envelope's code."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from cli.client import Client, IngotError
from tests.helpers import make_key


def test_a_rate_limited_call_is_tried_again_after_retry_after(api_url):
    admin = make_key(["admin"])
    with Client(api_url, admin) as setup:
        tier = setup.create_key("tier", ["read"], rate_limit_per_minute=2)
    waits: list[float] = []
    with Client(api_url, tier["key"], retries=2, sleep=waits.append) as client:
        client.jobs()
        client.jobs()
        with pytest.raises(IngotError) as refused:
            client.jobs()  # 429, tried twice more after Retry-After, still 429: raised
    assert refused.value.status == 429 and refused.value.code == "RATE_LIMIT_EXCEEDED"
    assert len(waits) == 2 and all(1 <= w <= 60 for w in waits)
    assert client.rate_limit["remaining"] == 0 and client.rate_limit["limit"] == 2


def test_a_503_is_tried_again_until_the_server_answers(api):
    answers = iter([(503, {"Retry-After": "3"}), (503, {"Retry-After": "1"}), (200, {})])

    def status(_query, _headers):
        code, headers = next(answers)
        body = {"success": code == 200, "data": {"status": "healthy"}} if code == 200 else {
            "success": False, "error": {"code": "SERVICE_UNAVAILABLE", "message": "later", "details": {}}}
        return code, {"Content-Type": "application/json", **headers}, json.dumps(body).encode()

    api.routes["/api/v1/health"] = status
    waits: list[float] = []
    heard: list[tuple[str, float]] = []
    with Client(api.url, sleep=waits.append, on_retry=lambda why, s: heard.append((why, s))) as client:
        assert client.health() == {"status": "healthy"}
    assert waits == [3.0, 1.0] and len(api.calls_to("/api/v1/health")) == 3
    assert heard == [("answered 503", 3.0), ("answered 503", 1.0)]  # each wait told before it is slept


def test_a_connection_refused_is_tried_again_and_each_wait_told_before_it_is_slept():
    from tests.helpers import free_port

    events: list[str] = []
    with Client(f"http://127.0.0.1:{free_port()}", retries=2, sleep=lambda s: events.append(f"slept {s:g}"),
                on_retry=lambda why, s: events.append(f"{why.split(' (')[0]}, {s:g} s")) as client:
        with pytest.raises(httpx.ConnectError):
            client.health()
    assert events == ["could not connect, 1 s", "slept 1", "could not connect, 2 s", "slept 2"]


def test_errors_carry_the_envelope_code_and_request_id(api_url):
    with Client(api_url, make_key(["read"])) as client:
        with pytest.raises(IngotError) as missing:
            client.job("job_missing")
        with pytest.raises(IngotError) as forbidden:
            client.keys()
    assert (missing.value.status, missing.value.code) == (404, "NOT_FOUND")
    assert missing.value.request_id and missing.value.request_id.startswith("req_")
    assert (forbidden.value.status, forbidden.value.code) == (403, "AUTHORIZATION_ERROR")


def test_the_client_reaches_every_operation_of_the_api(api_url):
    """Each client method called once (most with ids that do not exist: the route answers all the
    same); the requests it made cover every operation in the OpenAPI document."""
    document = httpx.get(f"{api_url}/openapi.json").json()
    operations = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops if p.startswith("/api/v1/")}
    seen: list[tuple[str, str]] = []
    client = Client(api_url, make_key(["admin"]), retries=0)
    client.http.event_hooks["request"].append(lambda r: seen.append((r.method, r.url.path)))
    calls = [
        client.health, client.status, client.me, lambda: client.login("nobody", "wrong"),
        lambda: client.create_key("k", ["read"]), client.keys, lambda: client.revoke_key("key_x"),
        lambda: client.rotate_key("key_x"), client.sources, lambda: client.source("s_x"),
        lambda: client.test_source("s_x"), client.start_ingestion, client.stop_ingestion, client.ingestion_status,
        client.quarantine, client.jobs, lambda: client.job("job_x"), lambda: client.cancel("job_x"),
        client.query, lambda: client.start_export("csv"), lambda: client.export_status("job_x"),
        lambda: client.download("job_x", "/dev/null"), client.curves,
        lambda: client.curve_diff("c", "2026-01-01", "2026-01-02"), client.dimensions, client.locations,
        lambda: client.location("loc_x"), lambda: client.create_scenario({}), client.scenarios,
        lambda: client.scenario("scn_x"), lambda: client.delete_scenario("scn_x"),
        lambda: client.run_scenario("scn_x"), lambda: client.scenario_runs("scn_x"),
        lambda: client.scenario_run("scn_x", "job_x"), lambda: client.cancel_scenario_run("job_x"),
        lambda: client.set_scenario_run_state("job_x", "cancelled"), lambda: client.scenario_outputs("scn_x"),
        lambda: client.scenario_metrics("scn_x"), lambda: client.create_webhook("http://10.0.0.1/", ["job.cancelled"]),
        client.webhooks, lambda: client.webhook("wh_x"), lambda: client.delete_webhook("wh_x"),
        lambda: client.deliveries("wh_x"), lambda: client.redeliver("wh_x", "dlv_x"), client.config,
        lambda: client.update_config({}), client.logs, client.metrics,
        lambda: client.create_user("u", "short", ["read"]), client.users, lambda: client.disable_user("usr_x"),
        lambda: list(client.watch("job_x")),
        client.refresh, client.logout,  # last: they act on a token, which this client (a key) has not
    ]
    for call in calls:
        try:
            call()
        except IngotError as exc:
            assert exc.status < 500, exc
    client.close()
    reached = {(m, p) for m, p in operations if any(sm == m and _template(p).fullmatch(sp) for sm, sp in seen)}
    assert operations - reached == set()


def _template(path: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)))
