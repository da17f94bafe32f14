"""Ownership on every path: an export and a webhook belong to the key that made them (and to admins),
whichever route reaches them; an export's events go only to its owner's and admins' endpoints; a
revoked or expired key's endpoints stop receiving at once, a rotated key's keep receiving.

The operations come from the OpenAPI document the API serves, as in the auth matrix: a route added
tomorrow that names an owned object is tried here without anyone writing it down.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import text

from pipelines.core.db import get_engine, session_scope
from testkit.datagen import sources_toml, write_csv
from testkit.receiver import Receiver
from tests.helpers import wait_for


@pytest.fixture
def worker(shared_worker):
    """This module's tests share one worker (tests/conftest.py)."""
    return shared_worker

# Path parameters that name an owned object, and which object they name.
JOB_PARAMETERS = ("job_id", "export_id", "run_id")
WEBHOOK_PARAMETERS = ("webhook_id",)


def new_key(scopes: list[str], expires_at: datetime | None = None) -> tuple[str, str]:
    from pipelines.auth import keys

    with session_scope() as session:
        row, key = keys.create_key(session, "owner-test", scopes, expires_at)
    return row.id, key


def operations(api_url: str) -> list[tuple[str, str]]:
    document = httpx.get(f"{api_url}/openapi.json").json()
    return sorted((method.upper(), path) for path, ops in document["paths"].items() for method in ops
                  if path.startswith("/api/v1/"))


def concrete(path: str, export_id: str, webhook_id: str) -> str | None:
    """PATH with the owned objects put in, or None if it names none."""
    names = re.findall(r"\{([^}]+)\}", path)
    if not any(n in JOB_PARAMETERS + WEBHOOK_PARAMETERS for n in names):
        return None
    for name in names:
        value = export_id if name in JOB_PARAMETERS else webhook_id if name in WEBHOOK_PARAMETERS else "x_missing"
        path = path.replace("{" + name + "}", value)
    return path


def test_another_key_gets_404_for_an_owned_export_or_webhook_on_every_path(api_url, no_worker):
    _a_id, a = new_key(["write"])
    _b_id, b = new_key(["write"])
    _admin_id, admin = new_key(["admin"])
    with httpx.Client(base_url=api_url, timeout=30) as http:
        export = http.post("/api/v1/data/export", json={"format": "csv"}, headers={"X-API-Key": a})
        assert export.status_code == 202, export.text
        export_id = export.json()["data"]["export_id"]
        hook = http.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/a", "events": ["export.completed"]},
                         headers={"X-API-Key": a})
        assert hook.status_code == 201, hook.text
        webhook_id = hook.json()["data"]["id"]

        tried, leaked = [], []
        for method, path in operations(api_url):
            target = concrete(path, export_id, webhook_id)
            if target is None:
                continue
            body = {"json": {}} if method in ("POST", "PUT") else {}
            answer = http.request(method, target, headers={"X-API-Key": b}, **body)
            tried.append(f"{method} {path}")
            # 404 as if it did not exist; 403 only where the scope alone refuses (admin's), before any lookup.
            if answer.status_code != (403 if path.endswith("/state") else 404):
                leaked.append(f"{method} {path}: {answer.status_code}")
        assert len(tried) >= 10, tried  # the document really was read
        assert not leaked, leaked

        # Lists leave them out for the other key and show them to the owner and to admins.
        def listed(key: str) -> tuple[set[str], set[str]]:
            jobs = http.get("/api/v1/jobs", params={"kind": "export"}, headers={"X-API-Key": key}).json()["data"]
            hooks = http.get("/api/v1/webhooks", headers={"X-API-Key": key}).json()["data"]
            return {j["id"] for j in jobs["jobs"]}, {h["id"] for h in hooks["webhooks"]}

        assert listed(b) == (set(), set())
        for key in (a, admin):
            jobs, hooks = listed(key)
            assert export_id in jobs and webhook_id in hooks
            assert http.get(f"/api/v1/jobs/{export_id}", headers={"X-API-Key": key}).status_code == 200

        # Nothing the other key sent touched them: the export is still queued, the webhook still there.
        assert http.get(f"/api/v1/jobs/{export_id}", headers={"X-API-Key": a}).json()["data"]["state"] == "queued"
        assert http.get(f"/api/v1/webhooks/{webhook_id}", headers={"X-API-Key": a}).json()["data"]["enabled"]
        cancelled = http.post(f"/api/v1/jobs/{export_id}/cancel", headers={"X-API-Key": a})
        assert cancelled.status_code == 202 and cancelled.json()["data"]["state"] == "cancelled"


def register(http: httpx.Client, key: str, receiver: Receiver, events: list[str]) -> str:
    answer = http.post("/api/v1/webhooks", json={"url": receiver.url, "events": events}, headers={"X-API-Key": key})
    assert answer.status_code == 201, answer.text
    receiver.secret = answer.json()["data"]["secret"]
    return answer.json()["data"]["id"]


def deliveries_to(webhook_id: str) -> int:
    with get_engine().connect() as conn:
        return conn.execute(text("SELECT count(*) FROM webhook_deliveries WHERE webhook_id = :w"),
                            {"w": webhook_id}).scalar_one()


def test_an_exports_events_reach_only_its_owner_and_admins(api_url, worker):
    _a_id, a = new_key(["write"])
    _b_id, b = new_key(["write"])
    _admin_id, admin = new_key(["admin"])
    events = ["export.completed", "export.failed", "job.cancelled"]
    owner, other, watcher = Receiver(), Receiver(), Receiver()
    try:
        with httpx.Client(base_url=api_url, timeout=30) as http:
            register(http, a, owner, events)
            other_hook = register(http, b, other, events)
            register(http, admin, watcher, events)
            export = http.post("/api/v1/data/export", json={"format": "csv"}, headers={"X-API-Key": a})
            assert export.status_code == 202, export.text
        wait_for(lambda: owner.received and watcher.received, timeout=60, message="the export's event")
        # The relay makes every endpoint's delivery of an event in one statement: had the other key's
        # endpoint been chosen, its delivery would exist by now.
        assert deliveries_to(other_hook) == 0 and not other.received
        assert owner.received[0]["verified"] and owner.received[0]["payload"]["type"].startswith(("export.", "job."))
    finally:
        for r in (owner, other, watcher):
            r.close()


def end_a_job(client, write_sources, data_dir) -> str:
    """A job that ends at once (an ingestion cancelled while queued): a job.cancelled event for all."""
    write_csv(data_dir / "a.csv", 3)
    write_sources(sources_toml("prices", "a.csv"))
    job_id = client.start_ingestion(["prices"])["job_id"]
    client.cancel(job_id)
    return job_id


def test_a_revoked_keys_endpoints_stop_at_once_and_a_rotated_keys_go_on(client, api_url, worker, write_sources,
                                                                        data_dir):
    revoked_id, revoked = new_key(["write"])
    rotated_id, rotated = new_key(["write"])
    gone, kept, control = Receiver(), Receiver(), Receiver()
    try:
        with httpx.Client(base_url=api_url, timeout=30) as http:
            gone_hook = register(http, revoked, gone, ["job.cancelled"])
            kept_hook = register(http, rotated, kept, ["job.cancelled"])
            register(http, client.http.headers["X-API-Key"], control, ["job.cancelled"])
            # A delivery already waiting for the revoked key's endpoint (a retry due later) is not sent.
            with get_engine().begin() as conn:
                conn.execute(text(
                    "INSERT INTO webhook_events (id, type, job_id, payload, created_at, dispatched_at) "
                    "VALUES ('evt_waiting', 'job.cancelled', 'job_waiting', '{}', now(), now())"))
                conn.execute(text(
                    "INSERT INTO webhook_deliveries (id, webhook_id, event_id, state, attempts, next_attempt_at, "
                    "created_at) VALUES ('dlv_waiting', :w, 'evt_waiting', 'pending', 1, now() + interval '1 hour', "
                    "now())"), {"w": gone_hook})
            assert client.http.delete(f"/api/v1/keys/{revoked_id}").status_code == 200
            assert http.post(f"/api/v1/keys/{rotated_id}/rotate", json={},
                             headers={"X-API-Key": client.http.headers["X-API-Key"]}).status_code == 200
        shown = client.request("GET", f"/webhooks/{gone_hook}")["data"]
        assert shown["enabled"] is False and shown["disabled_reason"] == "key_revoked" and shown["disabled_at"]
        assert client.request("GET", f"/webhooks/{kept_hook}")["data"]["enabled"] is True

        with get_engine().begin() as conn:  # the waiting retry comes due
            conn.execute(text("UPDATE webhook_deliveries SET next_attempt_at = now() WHERE id = 'dlv_waiting'"))
        end_a_job(client, write_sources, data_dir)
        wait_for(lambda: control.received and kept.received, timeout=60, message="the live endpoints' events")
        wait_for(lambda: _state("dlv_waiting") == "failed", timeout=60, message="the waiting retry to be settled")
        assert not gone.received
        assert deliveries_to(gone_hook) == 1  # only the one that was already waiting, never sent
        assert kept.received[0]["verified"]
    finally:
        for r in (gone, kept, control):
            r.close()


def _state(delivery_id: str) -> str:
    with get_engine().connect() as conn:
        return conn.execute(text("SELECT state FROM webhook_deliveries WHERE id = :d"), {"d": delivery_id}).scalar_one()


def test_an_expired_keys_endpoints_receive_nothing_and_are_then_marked(client, api_url, worker, write_sources,
                                                                      data_dir):
    from pipelines.webhooks import endpoints

    expires = datetime.now(UTC) + timedelta(seconds=2)
    _key_id, expiring = new_key(["write"], expires)
    lapsed, control = Receiver(), Receiver()
    try:
        with httpx.Client(base_url=api_url, timeout=30) as http:
            lapsed_hook = register(http, expiring, lapsed, ["job.cancelled"])
            register(http, client.http.headers["X-API-Key"], control, ["job.cancelled"])
        wait_for(lambda: datetime.now(UTC) > expires, timeout=10, message="the key's expiry")
        end_a_job(client, write_sources, data_dir)
        wait_for(lambda: control.received, timeout=60, message="the live endpoint's event")
        assert deliveries_to(lapsed_hook) == 0 and not lapsed.received
        with session_scope() as session:  # as beat's relay does (it may have been there first)
            endpoints.close_orphaned(session)
        shown = client.request("GET", f"/webhooks/{lapsed_hook}")["data"]
        assert shown["enabled"] is False and shown["disabled_reason"] == "key_expired"
    finally:
        for r in (lapsed, control):
            r.close()


@pytest.mark.parametrize(("kind", "job_owner", "caller", "shown"), [
    ("export", "key_a", "key_a", True), ("export", "key_a", "key_b", False), ("export", "key_a", None, True),
    ("export", None, "key_b", False), ("ingestion", "key_a", "key_b", True), ("scenario_run", None, "key_b", True)])
def test_who_sees_which_job(kind, job_owner, caller, shown):
    from pipelines.jobs.listing import visible

    assert visible(kind, job_owner, caller) is shown
