"""Webhooks: signed, retried, logged, redeliverable, and never aimed at internal addresses by mistake."""

import base64
import threading
import time

import pytest
from sqlalchemy import text
from standardwebhooks import Webhook as Verifier
from standardwebhooks.webhooks import WebhookVerificationError

from pipelines.core.db import driver, get_engine
from testkit.datagen import sources_toml, write_csv
from testkit.receiver import Receiver
from tests.helpers import end_jobs, free_port, wait_for


@pytest.fixture
def worker(shared_worker):
    """This module's tests share one worker (tests/conftest.py)."""
    return shared_worker


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def register(client, url, events, secret=None) -> dict:
    body = {"url": url, "events": events, **({"secret": secret} if secret else {})}
    return client.request("POST", "/webhooks", json=body)["data"]


def queued_then_cancelled(client, write_sources, data_dir) -> str:
    """A job that ends at once (cancelled while queued): the quickest real job end."""
    write_csv(data_dir / "a.csv", 3)
    write_sources(sources_toml("prices", "a.csv"))
    job_id = client.start_ingestion(["prices"])["job_id"]
    client.cancel(job_id)
    return job_id


def deliveries(client, hook_id) -> list[dict]:
    return client.request("GET", f"/webhooks/{hook_id}/deliveries")["data"]["deliveries"]


def test_endpoints_secrets_and_validation(client):
    created = client.http.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/x", "events": ["job.cancelled"]})
    assert created.status_code == 201
    hook = created.json()["data"]
    assert hook["secret"].startswith("whsec_") and len(base64.b64decode(hook["secret"][6:])) >= 24
    shown = client.request("GET", f"/webhooks/{hook['id']}")["data"]
    assert "secret" not in shown and shown["enabled"] is True and shown["events"] == ["job.cancelled"]
    with get_engine().connect() as conn:
        stored = conn.execute(text("SELECT secret_encrypted FROM webhooks")).scalar_one()
    assert hook["secret"] not in stored and hook["secret"][6:] not in stored
    own = "whsec_" + base64.b64encode(b"x" * 32).decode()
    assert register(client, "http://127.0.0.1:9/y", ["export.completed"], own)["secret"] == own
    for bad in ({"url": "ftp://x", "events": ["job.cancelled"]}, {"url": "http://x", "events": ["job.done"]},
                {"url": "http://127.0.0.1/", "events": ["job.cancelled"], "secret": "whsec_c2hvcnQ="},
                {"url": "http://127.0.0.1/", "events": []}):
        r = client.http.post("/api/v1/webhooks", json=bad)
        assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_ERROR", bad
    assert len(client.request("GET", "/webhooks")["data"]["webhooks"]) == 2
    assert client.http.delete(f"/api/v1/webhooks/{hook['id']}").status_code == 200
    assert client.http.get(f"/api/v1/webhooks/{hook['id']}").status_code == 404
    assert len(client.request("GET", "/webhooks")["data"]["webhooks"]) == 1


def test_a_job_end_writes_its_event_only_when_an_enabled_endpoint_subscribes_to_its_type(client, receiver):
    """The outbox row is written for endpoints that will read it: with none subscribed to a job's event
    (none at all, one deleted, one disabled, one for other events), its end writes nothing to relay."""
    def ended(prefix: str) -> list[str]:
        end_jobs(2, prefix)
        with get_engine().connect() as conn:
            return list(conn.execute(text("SELECT type FROM webhook_events WHERE job_id LIKE :p || '%' "
                                          "ORDER BY job_id"), {"p": prefix}).scalars())

    assert ended("job_none_") == []
    other = register(client, f"{receiver.url}/a", ["export.completed"])
    gone = register(client, f"{receiver.url}/b", ["ingestion.completed"])
    assert client.http.delete(f"/api/v1/webhooks/{gone['id']}").status_code in (200, 204)
    off = register(client, f"{receiver.url}/c", ["ingestion.completed"])
    with get_engine().begin() as conn:
        conn.execute(text("UPDATE webhooks SET enabled = false WHERE id = :id"), {"id": off["id"]})
    assert ended("job_unheard_") == []
    assert other["enabled"]

    register(client, f"{receiver.url}/d", ["ingestion.failed", "ingestion.completed"])
    assert ended("job_heard_") == ["ingestion.completed", "ingestion.completed"]


def test_each_job_end_reaches_each_subscriber_once_signed(client, worker, write_sources, data_dir):
    both, failures, exports = Receiver(), Receiver(), Receiver()
    try:
        a = register(client, both.url, ["ingestion.completed", "ingestion.failed"])
        b = register(client, failures.url, ["ingestion.failed"])
        c = register(client, exports.url, ["export.completed"])
        both.secret, failures.secret, exports.secret = a["secret"], b["secret"], c["secret"]
        write_csv(data_dir / "good.csv", 10)
        (data_dir / "bad.csv").write_text("id\n1\n")
        write_sources(sources_toml("prices", "good.csv") + sources_toml("broken", "bad.csv"))
        good = client.wait(client.start_ingestion(["prices"])["job_id"], timeout=60)
        bad = client.wait(client.start_ingestion(["broken"])["job_id"], timeout=60)
        assert (good["state"], bad["state"]) == ("succeeded", "failed")
        wait_for(lambda: len(both.received) >= 2 and len(failures.received) >= 1, timeout=30,
                 message="the deliveries")
        time.sleep(1)  # room for a wrong extra delivery to show up
        assert all(r["verified"] for r in both.received + failures.received)
        assert sorted(r["payload"]["type"] for r in both.received) == ["ingestion.completed", "ingestion.failed"]
        assert [r["payload"]["type"] for r in failures.received] == ["ingestion.failed"]
        assert exports.received == []
        done = both.verified("ingestion.completed")[0]
        assert done["payload"]["data"]["id"] == good["id"] and done["payload"]["data"]["records_processed"] == 10
        assert done["payload"]["timestamp"].endswith("Z")
        failed = failures.verified()[0]["payload"]["data"]
        assert failed["id"] == bad["id"] and "missing required column" in failed["error"]
        # the receiver's verifier refuses a tampered body and a stale timestamp
        verifier = Verifier(a["secret"])
        with pytest.raises(WebhookVerificationError):
            verifier.verify(done["body"].replace(b'"succeeded"', b'"failed"'), done["headers"])
        old = Verifier(a["secret"]).sign(done["headers"]["webhook-id"], __import__("datetime").datetime(2020, 1, 1),
                                         done["body"].decode())
        stale = {**done["headers"], "webhook-timestamp": "1577836800", "webhook-signature": old}
        with pytest.raises(WebhookVerificationError):
            verifier.verify(done["body"], stale)
        log = deliveries(client, a["id"])
        assert sorted(d["event_type"] for d in log) == ["ingestion.completed", "ingestion.failed"]
        assert all(d["state"] == "succeeded" and d["attempt_log"][0]["status_code"] == 200 for d in log)
    finally:
        for r in (both, failures, exports):
            r.close()


def test_retries_until_the_receiver_answers_with_a_stable_id(client, worker, write_sources, data_dir):
    port = free_port()
    hook = register(client, f"http://127.0.0.1:{port}/hook", ["job.cancelled"])
    queued_then_cancelled(client, write_sources, data_dir)
    wait_for(lambda: (d := deliveries(client, hook["id"])) and d[0]["attempts"] >= 2, timeout=30,
             message="failed attempts while the receiver is down")
    receiver = Receiver(port, secret=hook["secret"])  # the secret set before the first retry can arrive
    try:
        wait_for(lambda: receiver.verified(), timeout=30, message="the delivery once the receiver is up")
        # The answer is recorded a moment after the receiver has it: wait for the record, not the receipt.
        log = wait_for(lambda: (d := deliveries(client, hook["id"])[0])["state"] != "pending" and d, timeout=10,
                       message="the answer to be recorded")
        assert log["state"] == "succeeded" and log["attempt_log"][-1]["status_code"] == 200
        assert all("ConnectError" in a["error"] for a in log["attempt_log"][:-1])
        assert receiver.received[0]["headers"]["webhook-id"] == log["event_id"]
    finally:
        receiver.close()


def test_500s_then_200_410_disables_and_redeliver(client, worker, write_sources, data_dir, receiver):
    hook = register(client, receiver.url, ["job.cancelled"])
    receiver.secret = hook["secret"]
    receiver.statuses = [500, 500, 500]
    queued_then_cancelled(client, write_sources, data_dir)
    wait_for(lambda: len(receiver.received) >= 4, timeout=30, message="four attempts")
    log = wait_for(lambda: (d := deliveries(client, hook["id"])) and d[0]["state"] == "succeeded" and d, timeout=10)
    assert [a["status_code"] for a in log[0]["attempt_log"]] == [500, 500, 500, 200]
    assert len({r["headers"]["webhook-id"] for r in receiver.received}) == 1
    assert all(a["duration_ms"] is not None for a in log[0]["attempt_log"])

    # after its last attempt a delivery is failed; redelivered by hand, it arrives with the same id
    receiver.received.clear()
    receiver.statuses = [503] * 4
    client.request("POST", f"/webhooks/{hook['id']}/deliveries/{log[0]['id']}/redeliver")
    failed = wait_for(lambda: (d := deliveries(client, hook["id"])) and d[0]["state"] == "failed" and d, timeout=30)
    assert len(failed[0]["attempt_log"]) == 8 and failed[0]["error"] == "HTTP 503"
    r = client.http.post(f"/api/v1/webhooks/{hook['id']}/deliveries/{log[0]['id']}/redeliver")
    assert r.status_code == 202
    wait_for(lambda: receiver.verified() and receiver.received[-1]["status"] == 200, timeout=30,
             message="the redelivery")
    assert receiver.received[-1]["headers"]["webhook-id"] == log[0]["event_id"]

    receiver.statuses = [410]
    client.wait(queued_then_cancelled(client, write_sources, data_dir))
    gone = wait_for(lambda: (h := client.request("GET", f"/webhooks/{hook['id']}")["data"]) and not h["enabled"]
                    and h, timeout=30, message="410 to disable the endpoint")
    assert "410" in gone["disabled_reason"]


def test_an_event_committed_before_the_worker_died_is_still_delivered(client, start_worker, write_sources,
                                                                       data_dir, receiver):
    hook = register(client, receiver.url, ["ingestion.completed"])
    receiver.secret = hook["secret"]
    write_csv(data_dir / "a.csv", 5)
    write_sources(sources_toml("prices", "a.csv"))
    worker = start_worker()
    job_id = client.start_ingestion(["prices"])["job_id"]
    with get_engine().connect() as conn:
        wait_for(lambda: conn.execute(text("SELECT state FROM jobs WHERE id = :id"), {"id": job_id}).scalar()
                 == "succeeded" or conn.rollback(), timeout=60, interval=0.005, message="the job to end")
    worker.kill()  # whatever the worker had not done yet is lost with it
    with get_engine().connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM webhook_events WHERE job_id = :id"),
                            {"id": job_id}).scalar_one() == 1  # committed with the job's final state
    start_worker()
    wait_for(lambda: receiver.verified("ingestion.completed"), timeout=60, message="the event after the restart")
    assert receiver.verified()[0]["payload"]["data"]["id"] == job_id


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/x", "http://10.0.0.1/x", "http://169.254.169.254/latest",
                                 "http://[::1]:8000/x", "http://localhost:8000/x", "http://[::ffff:127.0.0.1]/x"])
def test_private_addresses_are_refused_when_not_allowed(client, url, configure):
    configure(webhook_allow_private=False)
    r = client.http.post("/api/v1/webhooks", json={"url": url, "events": ["job.cancelled"]})
    assert r.status_code == 422 and "does not resolve to a public address" in r.json()["error"]["message"]


def test_delivery_time_check_refuses_private_targets(client, start_worker, write_sources, data_dir, receiver):
    hook = register(client, receiver.url, ["job.cancelled"])  # allowed when registered...
    start_worker(env={"INGOT_WEBHOOK_ALLOW_PRIVATE": "false"})  # ...but not by the worker that delivers
    queued_then_cancelled(client, write_sources, data_dir)
    log = wait_for(lambda: (d := deliveries(client, hook["id"])) and d[0]["state"] == "failed" and d, timeout=30)
    assert all(a["error"].startswith("refused:") for a in log[0]["attempt_log"])
    assert receiver.received == []


def test_an_endpoint_failing_for_too_long_is_disabled(client, start_worker, write_sources, data_dir, receiver):
    hook = register(client, receiver.url, ["job.cancelled"])
    receiver.statuses = [500] * 100
    start_worker(env={"INGOT_WEBHOOK_DISABLE_AFTER_SECONDS": "0.5"})
    queued_then_cancelled(client, write_sources, data_dir)
    shown = wait_for(lambda: (h := client.request("GET", f"/webhooks/{hook['id']}")["data"]) and not h["enabled"]
                     and h, timeout=30, message="the endpoint to be disabled")
    assert shown["disabled_reason"].startswith("every delivery failed since") and shown["failing_since"]
    assert client.http.post(f"/api/v1/webhooks/{hook['id']}/deliveries/dlv_x/redeliver").status_code == 409


def test_the_outbox_wakes_the_relay_without_polling(client, start_worker, receiver, write_sources, data_dir):
    """With the periodic relay an hour apart, an event committed by the API (a cancel) and a retry
    falling due are both delivered within seconds: the NOTIFY and the due time wake the relay."""
    worker = start_worker(beat=False, env={"INGOT_WEBHOOK_RELAY_INTERVAL_SECONDS": "3600"})
    hook = register(client, receiver.url, ["job.cancelled"])
    receiver.secret = hook["secret"]
    receiver.statuses = [503]  # the first attempt fails; the retry is due 0.3 s later
    began = time.monotonic()
    job_id = queued_then_cancelled(client, write_sources, data_dir)
    try:
        wait_for(lambda: len(receiver.received) >= 2, timeout=30, message="the delivery and its retry")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; received {len(receiver.received)}; deliveries "
                             f"{deliveries(client, hook['id'])}\n{worker.output()}") from None
    assert time.monotonic() - began < 30
    assert [r["payload"]["data"]["id"] for r in receiver.received] == [job_id, job_id]
    assert all(r["verified"] for r in receiver.received)


def test_the_listeners_own_relay_wakes_no_one_but_every_other_write_does(client, receiver):
    """The outbox listener reads when to wake next right after it relays, so the deliveries its relay
    makes send no NOTIFY (each once woke it to relay again, for nothing: migration 0022); an event's
    commit and any other relay (the API's, beat's) still wake it."""
    import psycopg

    from pipelines.core.db import session_scope
    from pipelines.webhooks import relay
    from pipelines.webhooks.relay import CHANNEL
    from worker.outbox import _libpq_url

    register(client, receiver.url, ["ingestion.completed"])
    with psycopg.connect(_libpq_url(), autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")

        def woken() -> list[str]:  # the payloads within half a second (they come at the commit, locally)
            return [notify.payload for notify in listener.notifies(timeout=0.5, stop_after=1)]

        end_jobs(3, "job_quiet_")
        named = woken()  # the events' commit, which names them (migration 0025): one NOTIFY a statement
        assert all(payload.startswith("events:") for payload in named)
        with get_engine().connect() as conn:
            events = conn.execute(text("SELECT id FROM webhook_events WHERE job_id LIKE 'job_quiet_%' ORDER BY id"))
            assert sorted(event for payload in named for event in payload.removeprefix("events:").split(",")) == \
                events.scalars().all()
        with psycopg.connect(_libpq_url(), autocommit=True) as own:  # as the listener relays
            relay.make_quiet(own)
            handed_out = relay.relay(own)
        with get_engine().connect() as conn:
            left_due = conn.execute(text(
                "SELECT count(*) FROM webhook_deliveries WHERE next_attempt_at IS NOT NULL")).scalar()
        # A new endpoint gets two at a time: one delivery is left due, for the listener's own next read.
        assert len(handed_out) == 2 and left_due == 1
        assert woken() == []
        end_jobs(3, "job_loud_")
        assert woken()
        with session_scope() as session:
            relay.relay(driver(session.connection()))
        assert woken() == [""]  # deliveries given a time: nothing to fan out, something to claim


def test_the_outbox_names_what_a_statement_inserts_up_to_a_hundred_events(client):
    """Migration 0025: a statement's events are named in its NOTIFY, so the listener fans them out by
    key; past 100 (or NOTIFY's 8,000 bytes) it says `sweep`; a statement that inserts none is silent."""
    import psycopg

    from pipelines.webhooks.relay import CHANNEL
    from worker.outbox import _libpq_url

    end_jobs(1, "job_named_")  # the jobs the events below belong to
    with psycopg.connect(_libpq_url(), autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        list(listener.notifies(timeout=0.5))  # the job's own event

        def insert(count: int, prefix: str, size: int = 8) -> list[str]:
            with get_engine().begin() as conn:
                conn.execute(text(
                    "INSERT INTO webhook_events (id, type, job_id, payload) SELECT :p || lpad(g::text, :size, '0'), "
                    "'job.succeeded', 'job_named_1', '{}' FROM generate_series(1, :n) g ON CONFLICT DO NOTHING"),
                    {"p": prefix, "n": count, "size": size})
            return [notify.payload for notify in listener.notifies(timeout=0.5)]

        assert insert(100, "evt_a_") == ["events:" + ",".join(f"evt_a_{n:08d}" for n in range(1, 101))]
        assert insert(101, "evt_b_") == ["sweep"]
        assert insert(90, "evt_c_", size=90) == ["sweep"]  # 90 ids of 96 characters: past 7,900 bytes
        assert insert(3, "evt_a_") == []  # every one already there: nothing inserted, nothing said


@pytest.mark.parametrize("payloads, sweep_due, relays", [
    (["events:msg_a,msg_b", "events:msg_c"], False, ["msg_a", "msg_b", "msg_c"]),  # those, by key
    ([""], False, []),  # a delivery given a time: nothing to fan out, something to claim
    (["events:msg_a", "sweep"], False, None),  # a statement past 100 events: look for them all
    (["events:msg_a,msg_b", "events:msg_c,msg_d,msg_e"], False, None),  # more than a batch (3 here): look
    ([], True, None),  # the wait ran out at the relay interval: the safety net looks
    ([], False, []),  # a wait for a retry ran out: claim it, no look through the pending index
])
def test_what_wakes_the_listener_decides_what_it_fans_out(payloads, sweep_due, relays, monkeypatch):
    import time

    import psycopg

    from pipelines.webhooks import relay
    from worker.outbox import _libpq_url, _woken_by

    monkeypatch.setattr(relay, "FAN_OUT_BATCH", 3)
    sweep_at = time.monotonic() + (0 if sweep_due else 60)
    with psycopg.connect(_libpq_url(), autocommit=True) as listener, \
            psycopg.connect(_libpq_url(), autocommit=True) as writer:
        listener.execute(f"LISTEN {relay.CHANNEL}")
        with writer.transaction():  # sent together, at the commit
            for payload in payloads:
                writer.execute("SELECT pg_notify(%s, %s)", (relay.CHANNEL, payload))
        assert _woken_by(listener, 1.0 if payloads else 0.2, sweep_at) == relays


def test_only_an_attempt_handed_out_after_the_pause_counts_as_a_failed_probe(client):
    """An endpoint is paused by a batch of failures; the attempts already in flight then (handed out
    before the pause) fail too, and must leave its probe where it was. Counting each as a failed probe
    doubled the wait each time, to minutes after the receiver was back. A probe that fails, handed out
    after the pause, doubles it; a failure whose hand-out is unknown is taken as a probe."""
    from datetime import timedelta

    from pipelines.core.settings import get_settings
    from pipelines.webhooks.delivery import _failed

    settings = get_settings()
    hook = register(client, "http://127.0.0.1:9/hook", ["ingestion.completed"])["id"]

    def state():
        with get_engine().connect() as conn:
            return conn.execute(text("SELECT paused_at, probe_at, probes, consecutive_failures, now() AS now "
                                     "FROM webhooks WHERE id = :w"), {"w": hook}).one()

    def fail(n: int, handed_out) -> None:
        with get_engine().begin() as conn:
            _failed(conn, hook, n, handed_out, settings)

    fail(settings.webhook_pause_after_failures, None)  # a batch's failures pause it
    paused = state()
    assert paused.paused_at is not None and paused.probes == 0
    assert paused.probe_at == paused.paused_at + timedelta(seconds=settings.webhook_probe_seconds)

    fail(3, paused.paused_at - timedelta(seconds=1))  # stragglers, handed out a second before the pause
    stragglers = state()
    assert (stragglers.probe_at, stragglers.probes) == (paused.probe_at, 0)
    assert stragglers.consecutive_failures == paused.consecutive_failures + 3

    fail(1, stragglers.now)  # the probe, handed out now (after the pause), fails
    probed = state()
    doubled = timedelta(seconds=2 * settings.webhook_probe_seconds)
    assert probed.probes == 1 and probed.probe_at >= probed.now + doubled - timedelta(seconds=1)

    fail(1, None)  # unknown: a failed probe, as before
    assert state().probes == 2


def test_a_fan_out_by_key_reads_the_key_whatever_the_statistics_say():
    """On a new install the events table's statistics are those of a nearly empty table. A plan kept
    from then (a prepared statement's generic plan) read every event to find the few a NOTIFY named,
    more of them with every job, until autovacuum's next ANALYZE: the listener's fan-out by key is
    planned afresh each time. Counted by PostgreSQL's own scan counters, in a database of its own."""
    import psycopg

    from pipelines.webhooks import relay
    from tests.helpers import counted, migrated_database_of_its_own

    with migrated_database_of_its_own("plans") as url:
        with psycopg.connect(url, autocommit=True) as writer, psycopg.connect(url, autocommit=True) as listener:
            def add(count: int, prefix: str) -> None:
                writer.execute("INSERT INTO webhook_events (id, type, job_id, payload, dispatched_at) SELECT "
                               "%s || g, 'job.succeeded', 'job_' || g, '{}', now() FROM generate_series(1, %s) g",
                               (prefix, count))

            def scans() -> tuple[int, int]:
                return counted(writer, listener, "SELECT seq_scan, idx_scan FROM pg_stat_user_tables "
                                                 "WHERE relname = 'webhook_events'")

            add(2, "msg_first_")
            writer.execute("ANALYZE webhook_events")  # as a new install's first autovacuum leaves it
            for n in range(30):  # the listener's first relays: a prepared statement's generic plan is made now
                relay.fan_out(listener, [f"msg_first_{n % 2 + 1}"])
            add(5_000, "msg_")  # then the jobs come, faster than autovacuum looks
            seq_before, idx_before = scans()
            for n in range(20):
                relay.fan_out(listener, [f"msg_{n * 100 + 1}", f"msg_{n * 100 + 2}"])
            seq_after, idx_after = scans()
    assert seq_after == seq_before, "a fan-out by key read the whole events table"
    assert idx_after >= idx_before + 20


def test_a_claim_reads_no_delivery_in_flight_but_those_it_asks_about():
    """A relay's claim looks, for each endpoint, for deliveries whose claim ran out, and, for one held to a
    few at a time (new, failing, paused), counts those still in flight. Both once read every delivery in
    flight (off indexes of every pending delivery, or of an endpoint's: 12,000 entries a claim in
    bench/webhooks.py, at 50 claims a second): an endpoint sent 3,000 at once made every relay read them
    all until they were answered, and the entries of those answered until a vacuum. Migration 0028 gives
    deliveries in flight an index by endpoint and claim: a claim reads what it asks for. Counted by
    PostgreSQL's own counters (rows read by scans, entries read off indexes), in a database of its own."""
    import psycopg

    from pipelines.webhooks import relay
    from tests.helpers import counted, migrated_database_of_its_own

    with migrated_database_of_its_own("claims") as url:
        with psycopg.connect(url, autocommit=True) as writer, psycopg.connect(url, autocommit=True) as listener:
            writer.execute("INSERT INTO webhooks (id, url, events, enabled, secret_encrypted, answered_at) VALUES "
                           "('wh_proven', 'http://a/', '{job.succeeded}', true, 'x', now()), "
                           "('wh_new', 'http://b/', '{job.succeeded}', true, 'x', NULL)")

            def add(prefix: str, endpoint: str, count: int, next_attempt: str, claimed_until: str) -> None:
                writer.execute(f"INSERT INTO webhook_deliveries (id, webhook_id, event_id, state, attempts, "
                               f"next_attempt_at, claimed_until) SELECT %s || g, %s, 'msg_' || %s || g, 'pending', "
                               f"1, {next_attempt}, {claimed_until} FROM generate_series(1, %s) g",
                               (prefix, endpoint, prefix, count))

            flying, later = "NULL", "now() + interval '1 hour'"
            add("dlv_answered_", "wh_proven", 3_000, flying, later)
            writer.execute("UPDATE webhook_deliveries SET state = 'delivered'")  # answered: their entries linger
            add("dlv_p", "wh_proven", 3_000, flying, later)  # sent at once, not answered yet
            add("dlv_flying", "wh_new", 1, flying, later)
            add("dlv_due", "wh_new", 4, "now() - interval '1 second' * g", "NULL")
            writer.execute("ANALYZE webhook_deliveries")

            def read() -> int:
                return counted(writer, listener, "SELECT t.seq_tup_read + (SELECT sum(i.idx_tup_read) FROM "
                               "pg_stat_user_indexes i WHERE i.relid = t.relid) FROM pg_stat_user_tables t "
                               "WHERE t.relname = 'webhook_deliveries'")[0]

            before = read()
            claimed = relay.claim(listener, per_endpoint=2)
            after = read()
    assert claimed == [("dlv_due4", "wh_new", True)]  # two in flight at most: one more, its oldest due
    assert after - before < 100  # not the 3,000 in flight to the proven endpoint, nor the 3,000 answered


def test_an_event_whose_notify_was_missed_is_relayed_when_the_wait_runs_out(client, start_worker, receiver):
    """The listener fans out by key what NOTIFYs name; an event none named (its notification lost while
    the listener reconnected, say: here a transaction as quiet as the listener's own) is found by the
    look it takes for every new event when its wait runs out (INGOT_WEBHOOK_RELAY_INTERVAL_SECONDS)."""
    start_worker(beat=False, env={"INGOT_WEBHOOK_RELAY_INTERVAL_SECONDS": "2"})
    receiver.secret = register(client, receiver.url, ["ingestion.completed"])["secret"]
    with get_engine().begin() as conn:
        conn.execute(text("SET LOCAL ingot.relaying = 'on'"))  # no NOTIFY from this transaction
        conn.execute(text(
            "INSERT INTO jobs (id, kind, state, progress, records_processed, records_failed, params, result, "
            "sources, attempts, timeout_seconds, checkpoint) "
            "VALUES ('job_unnamed', 'ingestion', 'running', 0, 0, 0, '{}', '{}', '{}', 1, 60, '{}')"))
        conn.execute(text("UPDATE jobs SET state = 'succeeded', finished_at = now() WHERE id = 'job_unnamed'"))
    wait_for(lambda: len(receiver.received) == 1, timeout=30, message="the unnamed event's delivery")
    assert receiver.received[0]["payload"]["data"]["id"] == "job_unnamed"
    assert receiver.received[0]["verified"]


def test_a_backlog_larger_than_one_relay_is_fanned_out_without_waiting(client, start_worker, receiver):
    """A relay fans out 1,000 events at a time and its own deliveries wake no one: the listener sees
    the events still waiting and relays again at once, not when the periodic relay (an hour here) or
    the next job's end comes, nor when the claims on the first 1,000 run out (30 s, as by default)."""
    start_worker(beat=False, env={"INGOT_WEBHOOK_RELAY_INTERVAL_SECONDS": "3600", "INGOT_WEBHOOK_CLAIM_SECONDS": "30"})
    receiver.secret = register(client, receiver.url, ["ingestion.completed"])["secret"]
    end_jobs(1, "job_first_")  # the endpoint answers once: from then on every due delivery is handed out at once
    wait_for(lambda: len(receiver.received) == 1, timeout=30, message="the first delivery")
    end_jobs(2_200, "job_backlog_")
    wait_for(lambda: len(receiver.received) >= 2_201, timeout=45, message="2,200 more deliveries")
    sent = [r["headers"]["webhook-id"] for r in receiver.received]
    assert len(set(sent)) == len(sent) == 2_201 and all(r["verified"] for r in receiver.received)


def test_an_unproven_endpoints_backlog_is_handed_out_as_it_answers_not_polled_for(client, receiver):
    """A new endpoint gets two deliveries at a time. The rest of its due backlog does not make the
    listener wake every 50 ms (it once did, reading every such delivery each time): the next wake is
    when a claim runs out, and the answers that free its places NOTIFY the relay instead."""
    import psycopg

    from pipelines.core.db import session_scope
    from pipelines.webhooks import delivery, relay
    from pipelines.webhooks.relay import CHANNEL
    from worker.outbox import _libpq_url, _seconds_to_next_due

    receiver.secret = register(client, receiver.url, ["ingestion.completed"])["secret"]
    end_jobs(50, "job_unproven_")
    with session_scope() as session:
        first = [d for d, _endpoint, unproven in relay.relay(driver(session.connection())) if unproven]
    assert len(first) == 2  # and 48 due, waiting for those two
    with psycopg.connect(_libpq_url(), autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        assert _seconds_to_next_due(listener, 3600) > 1.0  # the claims' end (3 s in the tests), not 0.05
        delivery.deliver(first, delivery.new_pool(2), 2)
        assert list(listener.notifies(timeout=5, stop_after=1))  # the answers woke it
    with session_scope() as session:
        rest = relay.relay(driver(session.connection()))
    assert len(rest) == 48 and not any(unproven for _d, _e, unproven in rest)  # it answered: all at once


class _Hostile:
    """A receiver answering with a gzip bomb, or a body trickled a byte at a time (bounded: 30 s)."""

    def __init__(self, mode: str):
        import gzip
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        bomb = gzip.compress(b"\0" * (50 * 2**20))  # 50 MiB of zeros in about 50 KiB

        class Handle(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if mode == "bomb":
                    self.send_response(200)
                    self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", str(len(bomb)))
                    self.end_headers()
                    self.wfile.write(bomb)
                    return
                self.send_response(500)
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                deadline = time.monotonic() + 30
                try:
                    while time.monotonic() < deadline:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:
                    pass  # the client hung up, as it should

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode", ["bomb", "trickle"])
def test_an_answer_is_never_unpacked_nor_waited_on_past_the_deadline(client, start_worker, write_sources,
                                                                     data_dir, mode):
    hostile = _Hostile(mode)
    try:
        hook = register(client, hostile.url, ["job.cancelled"])
        start_worker(env={"INGOT_WEBHOOK_TIMEOUT_SECONDS": "1", "INGOT_WEBHOOK_RETRY_SCHEDULE": "0"})
        queued_then_cancelled(client, write_sources, data_dir)
        log = wait_for(lambda: (d := deliveries(client, hook["id"])) and d[0]["state"] != "pending" and d,
                       timeout=40, message="the attempt to end")
    finally:
        hostile.close()
    attempt = log[0]["attempt_log"][0]
    if mode == "bomb":
        assert log[0]["state"] == "succeeded" and attempt["response_excerpt"] == "(gzip-encoded answer, not decoded)"
    else:
        assert attempt["status_code"] == 500 and attempt["duration_ms"] < 5000, attempt  # 1 s deadline, one read
        assert 1 <= len(attempt["response_excerpt"]) < 30


def claimed() -> list[str]:
    """Every due delivery, however many to one endpoint (these tests hand them to tasks themselves)."""
    from pipelines.core.db import session_scope
    from pipelines.webhooks import relay

    with session_scope() as session:
        due = relay.relay(driver(session.connection()), per_endpoint=10_000)
    return [delivery for delivery, _endpoint, _failing in due]


def test_a_batch_handed_to_two_tasks_at_once_is_sent_once(client, receiver):
    """Deliveries go out in batches, several at a time; a batch handed out twice at the same moment
    (its claim ran out while the first task still held it) is attempted by one task only."""
    from pipelines.webhooks import delivery

    hook = register(client, receiver.url, ["ingestion.completed"])
    receiver.secret, receiver.delay = hook["secret"], 0.05
    end_jobs(40, "job_twice_")
    ids = claimed()
    assert len(ids) == 40
    pool = delivery.new_pool(8)
    results: list[dict] = []
    tasks = [threading.Thread(target=lambda: results.append(delivery.deliver(ids, pool, 4))) for _ in range(2)]
    for task in tasks:
        task.start()
    for task in tasks:
        task.join(30)
    sent = [r["headers"]["webhook-id"] for r in receiver.received]
    assert len(sent) == 40 and len(set(sent)) == 40 and all(r["verified"] for r in receiver.received)
    with get_engine().connect() as conn:
        attempts = conn.execute(text("SELECT count(*), count(DISTINCT delivery_id) FROM webhook_attempts")).one()
        states = conn.execute(text("SELECT state, count(*) FROM webhook_deliveries GROUP BY state")).all()
    assert tuple(attempts) == (40, 40) and states == [("succeeded", 40)]
    assert sorted(len(r) for r in results)[-1] == 40  # the task that held the batch reports every delivery


def test_one_batch_settles_each_endpoint_by_its_own_answers(client, receiver):
    """A batch spanning a failing endpoint and a healthy one: the healthy one's deliveries succeed,
    the failing one's are retried later and only its endpoint is marked failing."""
    from pipelines.webhooks import delivery

    good = register(client, receiver.url, ["ingestion.completed"])
    bad = register(client, f"http://127.0.0.1:{free_port()}/nobody", ["ingestion.completed"])
    receiver.secret = good["secret"]
    end_jobs(5, "job_mixed_")
    states = delivery.deliver(claimed(), delivery.new_pool(4), 4)
    assert sorted(states.values()) == ["pending"] * 5 + ["succeeded"] * 5
    assert len(receiver.verified("ingestion.completed")) == 5
    shown = {h["id"]: client.request("GET", f"/webhooks/{h['id']}")["data"] for h in (good, bad)}
    assert shown[good["id"]]["failing_since"] is None and shown[bad["id"]]["failing_since"]
    retried = deliveries(client, bad["id"])
    assert len(retried) == 5 and all(d["state"] == "pending" and "ConnectError" in d["attempt_log"][0]["error"]
                                     for d in retried)


def test_an_answer_kept_through_a_database_restart_is_recorded_not_sent_again(client, receiver):
    """The receiver answers 2xx while PostgreSQL is down (it is restarted between the request and the
    answer): the task keeps the answer and records it when the database is back, within the
    delivery's claim, so the event is sent once and logged as delivered."""
    from pgserver import pg_ctl  # type: ignore[attr-defined]

    from pipelines.core import embedded
    from pipelines.webhooks import delivery

    server = embedded._postgres
    if server is None:
        pytest.skip("INGOT_TEST_DATABASE_URL is set: the tests do not own that PostgreSQL, so cannot restart it")
    hook = register(client, receiver.url, ["ingestion.completed"])
    receiver.secret = hook["secret"]
    end_jobs(1, "job_restart_")
    ids = claimed()
    with get_engine().begin() as conn:  # a claim that outlasts the restart, as in production
        conn.execute(text("UPDATE webhook_deliveries SET claimed_until = now() + interval '60 seconds'"))
    original = receiver.server.RequestHandlerClass.do_POST

    def restart_then_answer(handler) -> None:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
        server.ensure_postgres_running()
        original(handler)

    receiver.server.RequestHandlerClass.do_POST = restart_then_answer
    try:
        states = delivery.deliver(ids, delivery.new_pool(2), 2)
    finally:
        receiver.server.RequestHandlerClass.do_POST = original
    assert states == {ids[0]: "succeeded"} and len(receiver.verified("ingestion.completed")) == 1
    logged = wait_for(lambda: deliveries(client, hook["id"]), timeout=30)
    assert [a["status_code"] for a in logged[0]["attempt_log"]] == [200]


def test_a_fault_with_one_delivery_leaves_the_rest_of_its_batch_recorded(client, receiver, monkeypatch):
    """An unexpected error preparing one delivery is that delivery's failed attempt (retried on
    schedule); the others of the batch are sent and recorded as usual."""
    from pipelines.core import netguard
    from pipelines.webhooks import delivery

    good = register(client, receiver.url, ["ingestion.completed"])
    broken = register(client, f"http://127.0.0.1:{receiver.port}/broken", ["ingestion.completed"])
    receiver.secret = good["secret"]
    resolve = netguard.resolve

    def faulty(url: str, allow_private: bool) -> str:
        if url.endswith("/broken"):
            raise RuntimeError("a bug")
        return resolve(url, allow_private)

    monkeypatch.setattr(netguard, "resolve", faulty)
    end_jobs(3, "job_fault_")
    states = delivery.deliver(claimed(), delivery.new_pool(4), 4)
    assert sorted(states.values()) == ["pending"] * 3 + ["succeeded"] * 3
    assert len(receiver.verified("ingestion.completed")) == 3
    retried = deliveries(client, broken["id"])
    assert all(d["attempt_log"][0]["error"] == "internal error (RuntimeError)" for d in retried)
