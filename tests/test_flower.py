"""Flower, started as `ingot flower`, shows the task of a real job through its own REST API."""

import os
import socket
import subprocess
import sys
import time

import httpx

from testkit.datagen import sources_toml, write_csv
from tests.helpers import ROOT, free_port, wait_for


def test_flower_lists_the_ingestion_task_with_its_final_state(client, worker, write_sources, data_dir, home):
    port = free_port()
    env = dict(os.environ, INGOT_FLOWER_PORT=str(port), INGOT_FLOWER_BASIC_AUTH="watcher:s3cret-pass",
               INGOT_API_REQUEST_TIMEOUT_SECONDS="2")
    log = open(home / "flower.log", "w")
    flower = subprocess.Popen([sys.executable, "-m", "cli.main", "flower"], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(f"{base}/healthcheck", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=30, message="Flower to listen")
        assert httpx.get(f"{base}/api/tasks").status_code == 401  # no anonymous access
        # A connection that sends no request is closed at the request deadline (2 s here), not held
        # for Tornado's hour.
        with socket.create_connection(("127.0.0.1", port)) as idle:
            idle.settimeout(10)
            began = time.monotonic()
            assert idle.recv(1) == b"" and time.monotonic() - began < 6

        def watching() -> bool:
            """Flower has received the worker's events: it will see the task arrive, name and all
            (it learns a task's name from the event of its arrival, which it may otherwise miss)."""
            seen = httpx.get(f"{base}/workers", params={"json": 1}, auth=("watcher", "s3cret-pass"), timeout=5)
            return seen.status_code == 200 and bool(seen.json()["data"])

        wait_for(watching, timeout=30, message="Flower to receive the worker's events")
        write_csv(data_dir / "a.csv", 20)
        write_sources(sources_toml("prices"))
        job = client.wait(client.start_ingestion(["prices"])["job_id"], timeout=60)
        assert job["state"] == "succeeded"

        def task_listed():
            tasks = httpx.get(f"{base}/api/tasks", auth=("watcher", "s3cret-pass"), timeout=5).json()
            return tasks.get(job["celery_task_id"])

        task = wait_for(lambda: (t := task_listed()) and t["state"] == "SUCCESS" and t, timeout=30,
                        message="Flower to list the task")
        assert task["name"] == "ingest.run" and job["id"] in task["args"]
        assert task["worker"] == worker.name
        workers = httpx.get(f"{base}/api/workers", params={"refresh": 1}, auth=("watcher", "s3cret-pass"),
                            timeout=10).json()
        assert worker.name in workers
    finally:
        flower.terminate()
        try:
            flower.wait(30)
        except subprocess.TimeoutExpired:  # a loaded machine can keep Tornado's shutdown waiting
            flower.kill()
            flower.wait()
        log.close()
