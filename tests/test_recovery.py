"""Redis loses its messages (a restart without persistence): the reaper re-sends, nothing is lost."""

import pytest
from sqlalchemy import text

from pipelines.core.db import get_engine
from testkit.datagen import sources_toml, write_csv
from tests.helpers import broker, wait_for
from worker.dispatch import queue_depth


@pytest.fixture
def worker(shared_worker):
    """This module's tests share one worker (tests/conftest.py)."""
    return shared_worker


def test_a_queued_job_whose_message_vanished_is_sent_again(client, start_worker, write_sources, data_dir):
    good, bad = write_csv(data_dir / "a.csv", 500, bad_every=50)
    write_sources(sources_toml("prices"))
    job_id = client.start_ingestion(["prices"])["job_id"]
    job = client.job(job_id)
    assert job["state"] == "queued" and queue_depth("ingestion") == 1

    broker().flushdb()  # every message and binding gone, as after a restart with no persistence
    assert queue_depth("ingestion") == 0

    start_worker()  # its beat runs the reaper, which finds the job's message missing
    done = client.wait(job_id, timeout=60)
    assert done["state"] == "succeeded" and done["records_processed"] == good
    assert done["celery_task_id"] != job["celery_task_id"]
    with get_engine().connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM observations")).scalar_one() == good


def test_status_reports_database_broker_workers_and_storage(client, worker, write_sources, data_dir):
    write_csv(data_dir / "a.csv", 12)
    write_sources(sources_toml("prices"))
    client.wait(client.start_ingestion()["job_id"], timeout=60)
    status = client.request("GET", "/status")["data"]
    assert status["ingestion"]["cycles_completed"] == 1 and status["ingestion"]["errors_count"] == 0
    assert status["ingestion"]["is_running"] is False and status["ingestion"]["last_cycle"].endswith("Z")
    assert status["database"]["connected"] is True and status["database"]["pool_size"] >= 1
    assert status["broker"]["connected"] is True and status["broker"]["queues"]["ingest"] == 0
    assert set(status["broker"]["queues"]) == {"ingest", "export", "scenarios", "webhooks", "default"}
    # Workers are counted by a live ping (0.5 s for replies): a busy machine may need another look.
    wait_for(lambda: client.request("GET", "/status")["data"]["workers"]["online"] >= 1, timeout=20,
             interval=0.5, message="the worker to answer the status page's ping")
    assert status["storage"]["total_records"] == 12 and status["storage"]["available_bytes"] > 0
    metrics = client.http.get("/metrics").text  # Prometheus text, open like /health
    assert 'ingot_jobs{kind="ingestion",state="succeeded"} 1.0' in metrics
    assert 'ingot_records_ingested_total{source="prices"} 12.0' in metrics
    assert 'ingot_queue_depth{queue="ingest"} 0.0' in metrics
    assert 'ingot_http_requests_total{method="GET",route="/api/v1/status",status="200"}' in metrics
    assert 'ingot_job_duration_seconds_count{kind="ingestion"} 1.0' in metrics


def test_openapi_document_lists_the_contract(api_url):
    import httpx

    spec = httpx.get(f"{api_url}/openapi.json").json()
    for path in ["/health", "/ready", "/api/v1/health", "/api/v1/status", "/api/v1/sources",
                 "/api/v1/sources/{source_id}", "/api/v1/ingestion/start", "/api/v1/ingestion/status",
                 "/api/v1/ingestion/quarantine", "/api/v1/jobs", "/api/v1/jobs/{job_id}"]:
        assert path in spec["paths"], path
    job_schema = spec["components"]["schemas"]["JobOut"]["properties"]
    assert {"id", "kind", "state", "progress", "records_processed", "records_failed", "params", "result",
            "error", "created_at", "started_at", "finished_at", "request_id", "celery_task_id"} <= set(job_schema)


def test_logs_and_json_metrics(client, worker, write_sources, data_dir, api_url):
    from cli.client import Client, IngotError
    from tests.helpers import make_key

    write_csv(data_dir / "a.csv", 8, bad_every=4)
    (data_dir / "bad.csv").write_text("id\n1\n")
    write_sources(sources_toml("prices", "a.csv") + sources_toml("broken", "bad.csv"))
    ok = client.wait(client.start_ingestion(["prices"])["job_id"], timeout=60)
    bad = client.wait(client.start_ingestion(["broken"])["job_id"], timeout=60)
    entries = client.request("GET", "/logs", params={"job_id": ok["id"]})["data"]["logs"]
    assert [e["event"] for e in entries] == ["source.ingested"] and entries[0]["details"]["records"] == 6
    errors = client.request("GET", "/logs", params={"level": "error"})["data"]["logs"]
    assert [e["job_id"] for e in errors] == [bad["id"]] and "missing required column" in errors[0]["message"]
    assert client.request("GET", "/logs", params={"level": "ERROR"})["data"]["logs"] == errors  # any letter case
    assert client.request("GET", "/logs", params={"level": "Critical"})["data"]["logs"] == []  # a level that exists
    page = client.request("GET", "/logs", params={"limit": 1})
    assert len(page["data"]["logs"]) == 1 and page["meta"]["next_cursor"]
    with Client(api_url, make_key(["read", "write"])) as writer, pytest.raises(IngotError) as info:
        writer.request("GET", "/logs")
    assert info.value.status == 403  # the journal is for admins
    summary = client.request("GET", "/metrics")["data"]
    assert summary["ingestion"]["records_per_second"] > 0 and summary["ingestion"]["active_jobs"] == 0
    assert summary["ingestion"]["error_rate"] == round(2 / 8, 4)
    assert summary["queues"]["ingest"] == 0
    host = summary["system"]
    assert 0 <= host["cpu_percent"] <= 100 and host["cpu_count"] >= 1 and len(host["load_average"]) == 3
    assert host["memory"]["total_bytes"] > host["memory"]["available_bytes"] > 0
    assert host["disk"]["total_bytes"] > 0 and host["disk"]["path"] == "INGOT_HOME"  # no server path shown


def test_runtime_config_is_admin_only_validated_and_applies_live(client, api_url, start_worker, write_sources,
                                                                 data_dir):
    from cli.client import Client, IngotError
    from tests.helpers import make_key

    start_worker()  # its own: a worker that read the settings before keeps them a few seconds more

    shown = client.request("GET", "/config")["data"]
    assert shown["config"]["batch_size"] == 50_000 and "reaper_interval_seconds" in shown["restart_required"]
    assert not any("secret" in name or "password" in name for name in shown["config"])
    with Client(api_url, make_key(["write"])) as writer, pytest.raises(IngotError) as info:
        writer.request("PUT", "/config", json={"batch_size": 5})
    assert info.value.status == 403
    for bad in ({"batch_size": 0}, {"batch_size": "lots"}, {"jwt_secret": "x"}, {"webhook_retry_schedule": "a,b"}):
        with pytest.raises(IngotError) as info:
            client.request("PUT", "/config", json=bad)
        assert info.value.status == 422, bad
    changed = client.request("PUT", "/config", json={"batch_size": 7, "reaper_interval_seconds": 30})["data"]
    assert changed["config"]["batch_size"] == 7 and changed["restart_required"] == ["reaper_interval_seconds"]
    write_csv(data_dir / "a.csv", 30)
    write_sources(sources_toml("prices", "a.csv"))
    job = client.wait(client.start_ingestion(["prices"])["job_id"], timeout=60)
    assert job["state"] == "succeeded" and job["result"]["sources"]["prices"]["batches"] == 5  # 30 rows, 7 a batch


def test_a_redis_restart_loses_no_queued_job(client, start_worker, write_sources, data_dir, embedded_redis):
    write_csv(data_dir / "a.csv", 40)
    write_sources(sources_toml("prices", "a.csv"))
    job_id = client.start_ingestion(["prices"])["job_id"]  # queued: no worker yet
    embedded_redis.stop()  # a real restart of the broker, with the message in it
    embedded_redis.start()
    start_worker()
    job = client.wait(job_id, timeout=90)
    assert job["state"] == "succeeded" and job["records_processed"] == 40


# --- the reaper's cost does not grow with the queue ----------------------------------------------------

WAITING = 20_000


def _counted_tick() -> tuple[dict, int, int]:
    """One reaper tick over the real broker, its marks old enough to act on: (report, statements,
    broker commands)."""
    from pipelines.core.roundtrips import RoundTrips
    from pipelines.jobs import reaper
    from worker.dispatch import send_job

    with get_engine().begin() as conn:
        conn.execute(text("UPDATE job_queue_marks SET marked_at = marked_at - interval '1 hour'"))
    with RoundTrips() as trips:
        report = reaper.reap(send_job, queue_depth)
    return report, trips.statements, trips.broker


def test_a_reaper_tick_costs_as_many_round_trips_over_twenty_thousand_waiting_jobs_as_over_none(no_worker):
    _counted_tick()  # the first marks
    _report, empty_statements, empty_broker = _counted_tick()

    # 20,000 queued jobs, each with its message waiting in the real broker (one real message, copied).
    with get_engine().begin() as conn:
        conn.execute(text(
            "INSERT INTO jobs (id, kind, state, progress, records_processed, records_failed, params, result, "
            "sources, timeout_seconds, attempts, checkpoint, celery_task_id, sent_at, send_seq, created_at) "
            "SELECT 'job_waiting_' || g, 'ingestion', 'queued', 0, 0, 0, '{}', '{}', '{}', 3600, 0, '{}', "
            "md5(g::text), now(), nextval('job_send_seq_ingestion'), now() FROM generate_series(1, :n) g"),
            {"n": WAITING})
    from pipelines.jobs.machine import Message
    from worker.dispatch import send_job

    send_job(Message("job_waiting_1", "ingestion", "first"))
    redis = broker()
    (body,) = redis.lrange("ingest", 0, -1)
    with redis.pipeline(transaction=False) as pipe:
        for _ in range(WAITING - 1):
            pipe.lpush("ingest", body)
        pipe.execute()
    assert queue_depth("ingestion") == WAITING

    report, statements, broker_commands = _counted_tick()
    assert report["resent"] == []  # every message waits: nothing to re-send
    assert (statements, broker_commands) == (empty_statements, empty_broker)
    assert statements <= 12 and broker_commands <= 12


def test_a_message_taken_by_a_worker_that_died_before_starting_it_is_sent_again_and_runs_once(
        client, start_worker, write_sources, data_dir):
    import subprocess
    import sys

    from tests.helpers import ROOT, wait_for

    good, _bad = write_csv(data_dir / "a.csv", 300, bad_every=50)
    write_sources(sources_toml("prices"))
    job_id = client.start_ingestion(["prices"])["job_id"]
    assert queue_depth("ingestion") == 1
    # A consumer takes the message as a worker does (not yet acknowledged), then dies on the spot.
    taker = subprocess.run([sys.executable, "-c", (
        "import os, signal\n"
        "from worker.app import app\n"
        "with app.connection_for_read() as conn:\n"
        "    message = conn.SimpleQueue('ingest').get(timeout=10)\n"
        "    print(message.headers['id'], flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert taker.stdout.strip() == client.job(job_id)["celery_task_id"], taker.stderr
    assert queue_depth("ingestion") == 0 and client.job(job_id)["state"] == "queued"
    held = broker().hgetall("unacked")  # where the Redis transport keeps a message handed out
    assert len(held) == 1

    start_worker()  # with beat: two reaper ticks, a grace period apart, and the job is sent again
    done = client.wait(job_id, timeout=60)
    assert done["state"] == "succeeded" and done["attempts"] == 1 and done["records_processed"] == good
    assert done["celery_task_id"] != taker.stdout.strip()

    # The old message comes back (as the broker would return it after its visibility timeout): the
    # worker takes it, finds the job ended, and does nothing.
    import json

    payload, _exchange, _routing_key = json.loads(next(iter(held.values())))
    broker().lpush("ingest", json.dumps(payload))
    wait_for(lambda: queue_depth("ingestion") == 0 and not broker().hlen("unacked"), timeout=30,
             message="the old message to be taken and acknowledged")
    again = client.job(job_id)
    assert (again["state"], again["attempts"], again["records_processed"]) == ("succeeded", 1, good)
    with get_engine().connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM observations")).scalar_one() == good
