"""Flower in a real browser: headless Chromium (Debian's `chromium`; `make test` installs it where missing)
logs in with Flower's basic auth, opens the tasks page while jobs run and again once they are done,
and finds ingestion, export, scenario and webhook tasks there by name and state. It saves a
screenshot of the page (`INGOT_SCREENSHOT_DIR`, else the test's scratch folder; the README shows one).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pipelines.curves import synthetic
from pipelines.curves.synthetic import DEMO
from testkit.curves import CURVES_SOURCE, write_curves
from testkit.datagen import write_csv
from testkit.receiver import Receiver
from tests.browser import chromium
from tests.helpers import ROOT, free_port, wait_for

pytestmark = pytest.mark.worker
USER, PASSWORD = "watcher", "s3cret-pass"
NAMES = ("ingest.run", "export.run", "scenarios.run", "webhooks.deliver")


def browse(browser: str, url: str, *how: str) -> str:
    """Load URL in headless Chromium, scripts run (and their requests answered) for up to 10 s."""
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--hide-scrollbars", "--virtual-time-budget=10000", *how, url],
                          capture_output=True, text=True, timeout=120)
    return done.stdout


@pytest.fixture
def flower(home):
    port = free_port()
    env = dict(os.environ, INGOT_FLOWER_PORT=str(port), INGOT_FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}")
    log = open(home / "flower-browser.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "flower"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=30, message="Flower to listen")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_flower_shows_every_kind_of_task_in_a_real_browser(client, worker, flower, write_sources, data_dir,
                                                           tmp_path):
    browser = chromium()
    page = f"http://{USER}:{PASSWORD}@127.0.0.1:{flower}/tasks"
    assert "ingest.run" not in browse(browser, f"http://127.0.0.1:{flower}/tasks", "--dump-dom")  # no password
    receiver = Receiver()
    try:
        receiver.secret = client.create_webhook(receiver.url, ["ingestion.completed", "export.completed",
                                                               "scenario.run.completed"])["secret"]
        write_csv(data_dir / "prices.csv", 20_000)
        write_curves(data_dir / "c.csv", synthetic.points(DEMO, synthetic.business_days(dt.date(2026, 11, 20), 2),
                                                          12))
        write_sources(CURVES_SOURCE.format(glob="c.csv")
                      + f'[sources.prices]\ntype = "file"\nformat = "csv"\npath = "{data_dir}/prices.csv"\n'
                        'primary_key = ["id"]\n')
        ingestion = client.start_ingestion(["prices", "curves"])["job_id"]
        while_running = browse(browser, page, "--dump-dom")  # the page, opened while the job runs
        assert client.wait(ingestion, timeout=120)["state"] == "succeeded"
        export = client.start_export("csv")["export_id"]
        scenario = client.create_scenario({"name": "browser", "base": {"curve_keys": ["NG_HENRY_HUB"]},
                                           "shocks": [{"type": "parallel", "value": 1.0}]})
        run = client.run_scenario(scenario["scenario_id"])["run_id"]
        for job_id in (export, run):
            assert client.wait(job_id, timeout=120)["state"] == "succeeded"
        wait_for(lambda: len(receiver.verified()) >= 3, timeout=60, message="the three webhook deliveries")

        def all_listed() -> str | None:
            dom = browse(browser, page, "--dump-dom")
            return dom if all(name in dom for name in NAMES) and "SUCCESS" in dom else None

        dom = wait_for(all_listed, timeout=90, interval=1, message="every kind of task on Flower's tasks page")
        assert 'id="tasks-table"' in while_running  # logged in: the tasks page itself rendered mid-run
        for job_id in (ingestion, export, run):
            assert client.job(job_id)["celery_task_id"] in dom  # each job's own task, by its id
        assert re.search(r"webhooks\.deliver.*?SUCCESS", dom, re.S)
        # Each task's arguments say what it is about: its page shows them, and the list's search finds
        # "the prices ingestion" by them (the request the search box makes).
        base = f"http://{USER}:{PASSWORD}@127.0.0.1:{flower}"
        for job_id, words in ((ingestion, "ingestion of prices, curves"), (export, "export of csv"),
                              (run, f"scenario_run of {scenario['scenario_id']}")):
            task_page = browse(browser, f"{base}/task/{client.job(job_id)['celery_task_id']}", "--dump-dom")
            assert f"{job_id}&#39;, {words}" in task_page or f"{job_id}', {words}" in task_page, words
        found = httpx.get(f"http://127.0.0.1:{flower}/tasks/datatable", auth=(USER, PASSWORD), params={
            "draw": 1, "start": 0, "length": 50, "search[value]": "args:prices", "order[0][column]": 0,
            "columns[0][data]": "received", "order[0][dir]": "desc"}).json()["data"]
        assert client.job(ingestion)["celery_task_id"] in [t["uuid"] for t in found]
        assert all("prices" in t["args"] for t in found)  # (earlier tests' ingestions of prices too)
        shots = Path(os.environ.get("INGOT_SCREENSHOT_DIR", tmp_path))
        shot = shots / "flower-tasks.png"
        browse(browser, page, "--window-size=1500,900", f"--screenshot={shot}")
        assert shot.exists() and shot.stat().st_size > 10_000
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        receiver.close()
