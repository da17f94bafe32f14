"""Schedules: beat runs a source repeatedly, never twice at once, and records the runs it skipped."""

import time

import pytest
from sqlalchemy import text

from pipelines.db import get_engine
from pipelines.schedules import parse
from pipelines.sources.registry import load_registry
from tests.conftest import wait_for
from tests.fakeapi import as_json, http_source, records


@pytest.mark.parametrize(("spec", "every", "cron"), [
    ("every 60s", 60, None), ("every 5 m", 300, None), ("every 2h", 7200, None),
    ("*/5 * * * 1-5", None, ("*/5", "*", "*", "*", "1-5")),
])
def test_schedule_specs(spec, every, cron):
    assert (parse(spec).every_seconds, parse(spec).cron) == (every, cron)


def test_a_bad_schedule_is_a_declaration_error(tmp_path):
    (tmp_path / "sources.toml").write_text('[sources.x]\ntype = "file"\npath = "a.csv"\nschedule = "hourly-ish"\n')
    assert "field 'schedule'" in load_registry(tmp_path / "sources.toml").errors["x"]


def test_a_source_every_2s_runs_repeatedly_and_never_overlaps(client, start_worker, write_sources, api):
    def slow(q, h):
        time.sleep(2.5)  # each run outlasts the 2 s period, so some ticks find it still running
        return as_json({"response": {"data": records(0, 5)}})

    api.routes["/slow"] = slow
    source = http_source("prices", f"{api.url}/slow", 'schedule = "every 2s"')
    write_sources(source.replace("timeout = 2", "timeout = 10"))
    start_worker(concurrency=2)  # two pool processes: overlap would be possible if the guard failed

    def finished_runs():
        jobs, _ = client.jobs(kind="ingestion", state="succeeded", limit=100)
        return len(jobs) >= 3 and jobs

    wait_for(finished_runs, timeout=90, interval=0.5, message="three scheduled runs")
    with get_engine().connect() as conn:
        runs = conn.execute(text("SELECT started_at, finished_at, request_id FROM jobs WHERE state = 'succeeded' "
                                 "ORDER BY started_at")).all()
        skipped = conn.execute(text("SELECT skipped FROM source_state WHERE source = 'prices'")).scalar_one()
        events = conn.execute(text("SELECT count(*) FROM events WHERE event = 'ingestion.scheduled'")).scalar_one()
    assert all(r.request_id == "schedule" for r in runs) and events >= 3
    for earlier, later in zip(runs, runs[1:], strict=False):
        assert earlier.finished_at <= later.started_at, "two runs of one source overlapped"
    assert skipped >= 1  # a tick that found the source running was skipped, not queued
    status = client.request("GET", "/status")["data"]["ingestion"]
    assert status["cycles_completed"] >= 3
