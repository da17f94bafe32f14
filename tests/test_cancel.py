"""Stop and cancel: queued jobs at once, running ones at their next batch, committed rows intact."""

import time

from sqlalchemy import text

from pipelines.core.db import get_engine
from testkit.datagen import sources_toml, write_csv
from tests.helpers import wait_for


def stored() -> int:
    with get_engine().connect() as conn:
        return conn.execute(text("SELECT count(*) FROM observations")).scalar_one()


def test_stopping_a_running_ingestion_keeps_committed_batches(client, worker, write_sources, data_dir):
    write_csv(data_dir / "big.csv", 200_000)
    write_sources(sources_toml("prices", "big.csv"))
    job_id = client.start_ingestion(["prices"], batch_size=1000)["job_id"]
    wait_for(lambda: client.job(job_id)["records_processed"] >= 5000, timeout=60, interval=0.02,
             message="some committed batches")
    asked = time.monotonic()
    stopped = client.stop_ingestion()
    assert stopped["status"] == "stopped" and stopped["jobs"] == [job_id] and stopped["stopped_at"].endswith("Z")
    job = client.wait(job_id, poll=0.1, timeout=30)
    assert job["state"] == "cancelled" and time.monotonic() - asked < 5
    assert 0 < job["records_processed"] < 200_000
    assert stored() == job["records_processed"]  # committed batches stay, the interrupted one left nothing
    assert client.ingestion_status()["is_running"] is False
    r = client.http.post(f"/api/v1/jobs/{job_id}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "CONFLICT"


def test_cancelling_a_queued_job_means_it_never_runs(client, start_worker, write_sources, data_dir):
    write_csv(data_dir / "a.csv", 10)
    write_sources(sources_toml("prices", "a.csv"))
    job_id = client.start_ingestion(["prices"])["job_id"]
    r = client.http.post(f"/api/v1/jobs/{job_id}/cancel")
    assert r.status_code == 202 and r.json()["data"]["state"] == "cancelled"
    start_worker()
    again = client.wait(client.start_ingestion(["prices"])["job_id"], timeout=60)  # the source is free again
    assert again["state"] == "succeeded"
    cancelled = client.job(job_id)
    assert cancelled["state"] == "cancelled" and cancelled["attempts"] == 0 and cancelled["records_processed"] == 0
    assert client.http.post("/api/v1/jobs/job_nope/cancel").status_code == 404
    assert client.http.post("/api/v1/ingestion/stop", json={"job_id": "job_nope"}).status_code == 404
