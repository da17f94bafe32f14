"""Neighbours who cannot hurt each other: one reader's statement that runs long is cut off with
QUERY_TOO_EXPENSIVE, holds no slot and no connection, and the others go on being answered."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import text

from pipelines.core.db import get_engine
from tests.helpers import api_processes, end_jobs, make_key


def test_a_statement_past_the_time_limit_is_422_and_holds_nothing(admin_key):
    reader = make_key(["read"])
    held, release = threading.Event(), threading.Event()

    def hold_the_tables() -> None:
        """What a long statement looks like from outside: the tables busy for as long as it runs."""
        with get_engine().connect() as conn:
            conn.execute(text("LOCK TABLE observations, jobs IN ACCESS EXCLUSIVE MODE"))
            held.set()
            release.wait(60)
            conn.rollback()

    with api_processes(1, INGOT_API_STATEMENT_TIMEOUT_MS="300", INGOT_API_CONCURRENCY="2") as (url,), \
            httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": reader}) as http:
        holder = threading.Thread(target=hold_the_tables)
        holder.start()
        try:
            assert held.wait(10)
            # More readers than the API lets in at once, on a sync route and on an async one.
            requests = [("POST", "/api/v1/data/query", {"sort": {"field": "value", "order": "desc"}})] * 3 + \
                       [("GET", "/api/v1/jobs/job_missing", None)] * 3
            with ThreadPoolExecutor(len(requests)) as pool:
                answers = list(pool.map(lambda r: http.request(r[0], r[1], json=r[2]), requests))
            for answer in answers:
                assert answer.status_code == 422, answer.text
                error = answer.json()["error"]
                assert error["code"] == "QUERY_TOO_EXPENSIVE" and "300 ms" in error["message"]
            assert http.get("/api/v1/health").status_code == 200
        finally:
            release.set()
            holder.join(30)
        # Nothing stayed stuck: every slot and connection came back.
        for _ in range(4):
            assert http.post("/api/v1/data/query", json={}).status_code == 200
            assert http.get("/api/v1/jobs/job_missing").status_code == 404


def _postgres_processes():
    """The session's embedded PostgreSQL: its postmaster and every backend (None when the tests were
    given a server of their own)."""
    import os
    from pathlib import Path

    import psutil

    pidfile = Path(os.environ["INGOT_HOME"]) / "pgdata" / "postmaster.pid"
    if not pidfile.exists():
        return None
    postmaster = psutil.Process(int(pidfile.read_text().split()[0]))
    return [postmaster, *postmaster.children(recursive=True)]


def test_a_frozen_database_gets_every_request_answered_in_time_and_nothing_stuck_after(admin_key):
    import signal
    import time

    import pytest

    from tests.helpers import wait_for

    if _postgres_processes() is None:
        pytest.skip("the tests were given a PostgreSQL of their own: it is not theirs to freeze")
    paths = ["/api/v1/jobs", "/api/v1/status", "/api/v1/sources", "/api/v1/scenarios", "/api/v1/jobs/job_missing",
             "/api/v1/webhooks"] * 2
    with api_processes(1, INGOT_API_REQUEST_TIMEOUT_SECONDS="3", INGOT_API_QUEUE_SECONDS="2") as (url,), \
            httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": admin_key}) as http:
        assert all(http.get(p).status_code in (200, 404) for p in paths)  # warm: keys checked, pools filled
        frozen = _postgres_processes()
        for process in frozen:
            process.send_signal(signal.SIGSTOP)
        try:
            def timed(path: str) -> tuple[int, float, str]:
                began = time.monotonic()
                answer = http.get(path)
                return answer.status_code, time.monotonic() - began, answer.headers.get("retry-after", "")

            with ThreadPoolExecutor(len(paths)) as pool:
                answers = list(pool.map(timed, paths))
            assert http.get("/api/v1/health").status_code == 200
        finally:
            for process in frozen:
                process.send_signal(signal.SIGCONT)
        for (status, seconds, retry_after), path in zip(answers, paths, strict=True):
            assert status == 503 and retry_after, (path, status)
            assert seconds < 3 + 2, (path, seconds)  # the deadline, and some room for a busy machine
        # Thawed: everything answers again, and no session of the API is left in a transaction.
        wait_for(lambda: all(http.get(p).status_code in (200, 404) for p in paths), timeout=30,
                 message="the API to answer after the thaw")

        def stuck() -> int:
            with get_engine().connect() as conn:
                return conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()")).scalar_one()

        wait_for(lambda: stuck() == 0, timeout=20, message="the abandoned sessions to be closed")


def test_an_abandoned_session_refuses_further_work_and_is_closed():
    import pytest

    from pipelines.core.db import Abandoned, abandon, new_session
    from tests.helpers import wait_for

    session = new_session(limited=True)
    backend = session.execute(text("SELECT pg_backend_pid()")).scalar_one()  # a transaction is open
    abandon(session)
    with pytest.raises(Abandoned):
        session.execute(text("SELECT 1"))
    with pytest.raises(Abandoned):
        session.commit()

    def state() -> str:
        with get_engine().connect() as conn:
            return conn.execute(text("SELECT state FROM pg_stat_activity WHERE pid = :p"), {"p": backend}).scalar_one()

    wait_for(lambda: state() == "idle", timeout=10, message="the abandoned session's transaction to end")


# --- one slow receiver delays no one else ------------------------------------------------------


def _lags(receivers, count: int) -> list[float]:
    """Seconds from each event's commit to its receipt, over every healthy receiver; each got COUNT
    events, each once, signed."""
    from datetime import datetime

    lags = []
    for receiver in receivers:
        ids = [r["headers"]["webhook-id"] for r in receiver.received]
        assert len(ids) == count and len(set(ids)) == count, (len(ids), len(set(ids)))
        assert all(r["verified"] for r in receiver.received)
        for r in receiver.received:
            sent = datetime.fromisoformat(r["payload"]["timestamp"].replace("Z", "+00:00")).timestamp()
            lags.append(r["at"] - sent)
    return sorted(lags)


def test_bad_receivers_are_cut_off_by_the_clock_paused_and_delay_no_one_else(client, start_worker):
    from testkit.receiver import BadReceiver, Receiver
    from tests.helpers import wait_for

    events, p99 = 150, {}
    start_worker(env={"INGOT_WEBHOOK_TIMEOUT_SECONDS": "1", "INGOT_WEBHOOK_PAUSE_AFTER_FAILURES": "3",
                      "INGOT_WEBHOOK_HAND_OFF_SECONDS": "0.2",
                      "INGOT_WEBHOOK_PROBE_SECONDS": "2", "INGOT_WEBHOOK_RETRY_SCHEDULE": "0,0.3,0.3,0.3,0.3,0.3"})

    def healthy_run(prefix: str, bad: list[str]) -> tuple[list, list[float]]:
        receivers = [Receiver() for _ in range(3)]
        hooks = []
        for receiver in receivers:
            hook = client.request("POST", "/webhooks", json={"url": receiver.url, "events": ["ingestion.completed"]})
            receiver.secret = hook["data"]["secret"]
            hooks.append(hook["data"]["id"])
        bad_hooks = [client.request("POST", "/webhooks", json={"url": url, "events": ["ingestion.completed"]})
                     ["data"]["id"] for url in bad]
        end_jobs(events, prefix)
        wait_for(lambda: all(len(r.received) >= events for r in receivers), timeout=120,
                 message="every healthy receiver's events")
        lags = _lags(receivers, events)
        for receiver in receivers:
            receiver.close()
        for hook in hooks:  # the next run's receivers are new ones
            client.request("DELETE", f"/webhooks/{hook}")
        return bad_hooks, lags

    _none, lags = healthy_run("job_alone_", [])
    p99["alone"] = lags[int(0.99 * (len(lags) - 1))]
    bad = [BadReceiver("trickle"), BadReceiver("hang"), BadReceiver("refuse")]
    try:
        bad_hooks, lags = healthy_run("job_crowd_", [b.url for b in bad])
        p99["crowd"] = lags[int(0.99 * (len(lags) - 1))]
        # The healthy endpoints are on time (within twice the time alone, and a second for a busy machine).
        assert p99["crowd"] <= 2 * p99["alone"] + 1.0, p99
        # Each bad one was tried on schedule, every attempt cut off by the clock, then paused.
        for hook in bad_hooks:
            shown = wait_for(lambda hook=hook: (h := client.request("GET", f"/webhooks/{hook}")["data"])["paused"]
                             and h, timeout=60, message="the bad endpoint to be paused")
            assert shown["paused_at"] and shown["next_probe_at"] and shown["consecutive_failures"] >= 3
            log = client.request("GET", f"/webhooks/{hook}/deliveries", params={"limit": 500})["data"]["deliveries"]
            attempts = [a for d in log for a in d["attempt_log"]]
            assert attempts and all(a["duration_ms"] < 2500 for a in attempts), attempts[:3]
        with get_engine().connect() as conn:
            noted = set(conn.execute(text("SELECT details->>'webhook_id' FROM events "
                                          "WHERE event = 'webhook.endpoint_paused'")).scalars())
        # (A healthy receiver swamped on a busy machine may be paused for a moment too, and resumed.)
        assert noted >= set(bad_hooks)
        paused = next(line for line in client.http.get("/metrics").text.splitlines()
                      if line.startswith("ingot_webhook_endpoints_paused "))
        assert float(paused.split()[1]) >= 3
    finally:
        for b in bad:
            b.close()


# --- no key takes more than its share ----------------------------------------------------------


def test_scenario_runs_and_exports_past_a_keys_quota_are_429_quota_exceeded(api_url, configure, no_worker):
    configure(max_scenario_runs_per_key=3, max_export_bytes_per_key=1000)
    key, other = make_key(["write"]), make_key(["write"])
    with get_engine().begin() as conn:
        conn.execute(text("INSERT INTO curve_index (curve_key, first_asof, last_asof) "
                          "VALUES ('K', '2026-11-02', '2026-11-02')"))
    with httpx.Client(base_url=api_url, timeout=30) as http:
        scenario = http.post("/api/v1/scenarios", headers={"X-API-Key": key}, json={
            "name": "quota", "base": {"curve_keys": ["K"]}, "shocks": [{"type": "parallel", "value": 1}]})
        assert scenario.status_code == 201, scenario.text
        run = f"/api/v1/scenarios/{scenario.json()['data']['scenario_id']}/run"
        answers = [http.post(run, headers={"X-API-Key": key}) for _ in range(4)]
        assert [a.status_code for a in answers] == [202, 202, 202, 429]
        error = answers[-1].json()["error"]
        assert error["code"] == "QUOTA_EXCEEDED" and error["details"] == {
            "quota": "scenario runs queued or running", "used": 3, "allowed": 3}
        assert http.post(run, headers={"X-API-Key": other}).status_code == 202  # another key has its own

        # Export files kept count against their key until they expire.
        with get_engine().begin() as conn:
            conn.execute(text(
                "INSERT INTO jobs (id, kind, state, progress, records_processed, records_failed, params, result, "
                "sources, attempts, timeout_seconds, checkpoint, api_key_id, finished_at) "
                "SELECT 'job_' || md5(random()::text), 'export', 'succeeded', 100, 0, 0, '{}', "
                "jsonb_build_object('file_size', 1200, 'expires_at', now() + interval '1 hour'), '{}', 1, 60, '{}', "
                "k.id, now() FROM api_keys k WHERE k.key_hash = :h"), {"h": __import__("hashlib").sha256(
                    key.encode()).hexdigest()})
        refused = http.post("/api/v1/data/export", json={"format": "csv"}, headers={"X-API-Key": key})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "QUOTA_EXCEEDED"
        assert refused.json()["error"]["details"] == {"quota": "bytes of export files kept", "used": 1200,
                                                       "allowed": 1000}
        assert 3000 <= int(refused.headers["Retry-After"]) <= 3600  # frees when the file expires
        assert http.post("/api/v1/data/export", json={"format": "csv"},
                         headers={"X-API-Key": other}).status_code == 202
