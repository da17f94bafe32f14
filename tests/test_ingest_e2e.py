"""End to end over HTTP with a real Celery worker consuming the real ingest queue."""

import pytest
from sqlalchemy import text

from pipelines.core.db import get_engine
from testkit.datagen import sources_toml, write_csv


@pytest.fixture
def worker(shared_worker):
    """This module's tests share one worker (tests/conftest.py)."""
    return shared_worker


def observations() -> list[tuple]:
    with get_engine().connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT id, timestamp, value, metadata, xmin::text FROM observations WHERE source = 'prices' ORDER BY id"))]


def test_ingest_quarantine_and_rerun_changes_nothing(client, worker, write_sources, data_dir):
    good_a, bad_a = write_csv(data_dir / "a.csv", 40, bad_every=9)
    good_b, bad_b = write_csv(data_dir / "b.csv", 25, bad_every=10, start=1000)
    write_sources(sources_toml("prices"))

    started = client.start_ingestion(["prices"], batch_size=7)
    job = client.wait(started["job_id"], timeout=60)
    assert job["state"] == "succeeded", job
    assert job["records_processed"] == good_a + good_b == 40 - 4 + 25 - 2
    assert job["records_failed"] == len(bad_a) + len(bad_b)
    assert job["progress"] == 100 and job["result"]["sources"]["prices"]["files"] == 2

    rows = observations()
    assert len(rows) == good_a + good_b
    first = rows[0]
    assert first[0] == "r00000000" and first[1].isoformat() == "2026-01-01T00:00:00+00:00"
    assert first[2] == 0.0 and first[3] == {"hub": "hub-0"}
    assert {r[0] for r in rows} == ({f"r{i:08d}" for i in range(40) if (i + 1) % 9}
                                    | {f"r{i:08d}" for i in range(1000, 1025) if (i - 999) % 10})

    quarantined, cursor = client.quarantine(job_id=job["id"], limit=3)
    assert cursor is not None and len(quarantined) == 3
    rest, cursor = client.quarantine(job_id=job["id"], cursor=cursor)
    assert cursor is None
    by_file = sorted((q["file"], q["line"]) for q in quarantined + rest)
    assert by_file == sorted([("data/a.csv", n) for n in bad_a] + [("data/b.csv", n) for n in bad_b])
    assert all(q["reason"] == "column 'px': cannot parse 'n/a' as float" for q in quarantined)
    assert quarantined[0]["raw"]["px"] == "n/a"

    unchanged = client.wait(client.start_ingestion(["prices"])["job_id"], timeout=60)  # neither file changed
    assert unchanged["state"] == "succeeded" and unchanged["records_processed"] == 0
    assert unchanged["result"]["sources"]["prices"]["unchanged"] == ["data/a.csv", "data/b.csv"]
    again = client.wait(client.start_ingestion(["prices"], force=True)["job_id"], timeout=60)  # read again
    assert again["state"] == "succeeded" and again["records_processed"] == job["records_processed"]
    assert observations() == rows  # same rows, same row versions: nothing rewritten

    status = client.ingestion_status()
    assert status["is_running"] is False and status["last_completed"]["id"] == again["id"]
    source = client.request("GET", "/sources/prices")["data"]
    assert source["status"] == "ok" and source["sync_stats"]["total_records"] == len(rows)
    listed, _ = client.jobs(kind="ingestion", state="succeeded")
    assert [j["id"] for j in listed] == [again["id"], unchanged["id"], job["id"]]


def test_a_bad_file_fails_its_job_clearly_and_the_worker_lives_on(client, worker, write_sources, data_dir):
    (data_dir / "broken.csv").write_text("id,px\n1,2\n")
    write_sources(sources_toml("broken", "broken.csv") + sources_toml("prices", "good.csv"))
    failed = client.wait(client.start_ingestion(["broken"])["job_id"], timeout=60)
    assert failed["state"] == "failed"
    assert "missing required column(s) ['timestamp']" in failed["error"] and "broken" in failed["error"]
    assert client.request("GET", "/sources/broken")["data"]["sync_stats"]["last_error"] == failed["error"]

    write_csv(data_dir / "good.csv", 10)
    ok = client.wait(client.start_ingestion(["prices"])["job_id"], timeout=60)
    assert ok["state"] == "succeeded" and ok["records_processed"] == 10
    assert worker.process.poll() is None
