"""Killed workers lose nothing: the job ends succeeded with exactly the right rows."""

import os
import signal

import pytest
from sqlalchemy import text

from pipelines.core.db import get_engine
from testkit.datagen import sources_toml, write_csv
from tests.helpers import wait_for

ROWS, BAD_EVERY, BATCH = 150_000, 1000, 1500


def job_row(job_id: str):
    with get_engine().connect() as conn:
        return conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().one()


def table_counts() -> tuple[int, int, int]:
    with get_engine().connect() as conn:
        return conn.execute(text(
            "SELECT (SELECT count(*) FROM observations), (SELECT count(DISTINCT id) FROM observations), "
            "(SELECT count(*) FROM quarantine)")).one()


@pytest.fixture
def big_source(write_sources, data_dir):
    good, bad = write_csv(data_dir / "big.csv", ROWS, bad_every=BAD_EVERY)
    write_sources(sources_toml("prices", "big.csv"))
    return good, bad


def start_and_catch_mid_way(client) -> str:
    job_id = client.start_ingestion(["prices"], batch_size=BATCH)["job_id"]
    wait_for(lambda: job_row(job_id)["records_processed"] >= 10 * BATCH, timeout=60, interval=0.02,
             message="the job to commit a few batches")
    row = job_row(job_id)
    assert row["state"] == "running" and row["records_processed"] < ROWS // 2, "job ran too fast to interrupt"
    return job_id


def assert_complete(client, job_id, good, bad):
    job = client.wait(job_id, timeout=120)
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2
    assert job["records_processed"] == good and job["records_failed"] == len(bad)
    assert table_counts() == (good, good, len(bad))


def test_killing_the_pool_process_requeues_and_resumes(client, worker, big_source):
    job_id = start_and_catch_mid_way(client)
    owner = job_row(job_id)["lease_owner"]
    pid = int(owner.rpartition(":")[2])
    assert pid != worker.process.pid
    os.kill(pid, signal.SIGKILL)
    assert_complete(client, job_id, *big_source)
    assert worker.process.poll() is None


def test_killing_the_whole_worker_then_starting_another_recovers(client, start_worker, big_source):
    first = start_worker()
    job_id = start_and_catch_mid_way(client)
    first.kill()
    committed = job_row(job_id)["records_processed"]
    assert 0 < committed < ROWS
    start_worker()  # with beat: its reaper finds the silent job and sends it again
    assert_complete(client, job_id, *big_source)
