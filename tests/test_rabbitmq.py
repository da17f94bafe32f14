"""RabbitMQ as the broker (INGOT_BROKER_URL=amqp://...): an API process and a worker on it run an
ingestion end to end over quorum queues with publisher confirms, while Redis keeps only the rate
limits and caches. Uses the RabbitMQ on 127.0.0.1:5672 (guest/guest) and skips, saying so, when there
is none. The fault suite runs its rounds over RabbitMQ too (tests/faults)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import pytest
from kombu import Connection, Queue

from testkit.datagen import sources_toml, write_csv
from tests.helpers import ROOT, api_processes, make_key, wait_for

pytestmark = pytest.mark.worker
URL = os.environ.get("INGOT_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def rabbitmq():
    if not _reachable():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672 (set INGOT_TEST_RABBITMQ_URL to use another)")
    with Connection(URL) as connection:  # what earlier runs left queued is not this test's
        for name in ("ingest", "export", "scenarios", "webhooks", "default"):
            try:
                Queue(name, queue_arguments={"x-queue-type": "quorum"}).bind(connection.default_channel).purge()
            except Exception:  # not declared yet
                connection.close()
                connection.connect()
    yield URL


def test_jobs_run_over_rabbitmq_with_quorum_queues(rabbitmq, write_sources, data_dir, home):
    write_csv(data_dir / "a.csv", 500)
    write_sources(sources_toml("prices", "a.csv"))
    env = {"INGOT_BROKER_URL": rabbitmq}
    worker = subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "--concurrency", "1"], cwd=ROOT,
                              env={**os.environ, **env}, start_new_session=True,
                              stdout=open(home / "rabbitmq-worker.log", "w"), stderr=subprocess.STDOUT)
    try:
        with api_processes(1, **env) as (url,):
            headers = {"X-API-Key": make_key(["admin"])}
            job = httpx.post(f"{url}/api/v1/ingestion/start", json={"sources": ["prices"]}, headers=headers,
                             timeout=30).json()["data"]["job_id"]

            def ended():
                found = httpx.get(f"{url}/api/v1/jobs/{job}", headers=headers, timeout=10).json()["data"]
                return found if found["state"] in ("succeeded", "failed", "cancelled") else None

            done = wait_for(ended, timeout=90, interval=0.3, message="the ingestion over RabbitMQ")
            assert done["state"] == "succeeded" and done["records_processed"] == 500, done
            broker = httpx.get(f"{url}/api/v1/status", headers=headers, timeout=30).json()["data"]["broker"]
            assert broker["connected"] and broker["queues"]["ingest"] == 0
        with Connection(rabbitmq) as connection:  # the worker consumes there, from a quorum queue
            declared = Queue("ingest", queue_arguments={"x-queue-type": "quorum"}).bind(
                connection.default_channel).queue_declare(passive=True)
            assert declared.consumer_count >= 1
            with pytest.raises(Exception, match="PRECONDITION_FAILED|inequivalent arg"):
                Queue("ingest", queue_arguments={"x-queue-type": "classic"}).bind(
                    connection.default_channel).queue_declare()
    finally:
        os.killpg(worker.pid, 9)
        worker.wait()
