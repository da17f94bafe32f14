"""Schedules: beat runs a source repeatedly, never twice at once, and records the runs it skipped."""

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from pipelines.core.db import get_engine
from pipelines.core.settings import get_settings
from pipelines.ingestion.sources.registry import load_registry
from pipelines.jobs.schedules import next_run, parse
from tests.fakeapi import as_json, http_source, records
from tests.helpers import ROOT, wait_for
from worker.schedule import beat_schedule, cron


@pytest.mark.parametrize(("spec", "every", "cron"), [
    ("every 60s", 60, None), ("every 5 m", 300, None), ("every 2h", 7200, None),
    ("*/5 * * * 1-5", None, "*/5 * * * 1-5"), ("  0  6 1 * *  ", None, "0 6 1 * *"),
])
def test_schedule_specs(spec, every, cron):
    assert (parse(spec).every_seconds, parse(spec).cron) == (every, cron)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# Fields in the standard order: minute, hour, day of month, month, day of week (0 or 7 = Sunday).
# 2026-11-27 is a Friday.
NEXT_RUNS = [
    ("*/15 6-20 * * 1-5", "2026-11-27T20:50", "2026-11-30T06:00"),  # weekdays only: Friday night -> Monday
    ("*/15 6-20 * * 1-5", "2026-11-30T06:00", "2026-11-30T06:15"),
    ("*/15 6-20 * * 1-5", "2026-06-10T12:07", "2026-06-10T12:15"),  # June is a month like any other
    ("0 9 1 * *", "2026-11-27T10:00", "2026-12-01T09:00"),          # day of month, not day of week
    ("30 2 * 6 *", "2026-11-27T00:00", "2027-06-01T02:30"),          # month is the fourth field
    ("0 0 * * 0", "2026-11-27T00:00", "2026-11-29T00:00"),          # Sunday
    ("0 0 * * 7", "2026-11-27T00:00", "2026-11-29T00:00"),
    ("0 12 29 2 *", "2026-03-01T00:00", "2028-02-29T12:00"),        # the next leap day
    ("5 4 * * sun", "2026-11-27T00:00", "2026-11-29T04:05"),
]


@pytest.mark.parametrize(("spec", "after", "expected"), NEXT_RUNS)
def test_cron_next_runs_follow_the_standard_field_order(spec, after, expected):
    assert parse(spec).next_after(utc(after)) == utc(expected)
    # beat's own schedule object agrees, and says the run is due exactly then
    schedule = cron(spec, nowfun=lambda: utc(expected))
    assert schedule.remaining_estimate(utc(after)) == timedelta(0)
    due, _next = schedule.is_due(utc(after))
    assert due
    not_yet = cron(spec, nowfun=lambda: utc(expected) - timedelta(seconds=1)).is_due(utc(after))
    assert not_yet == (False, 1.0)


NOW = utc("2026-11-27T12:00:30")


@pytest.mark.parametrize(("spec", "last_fired", "expected"), [
    ("every 60s", "2026-11-27T12:00:00", "2026-11-27T12:01:00"),   # an interval from beat's last tick
    ("every 10s", "2026-11-27T11:00:00", "2026-11-27T12:00:30"),   # late: beat fires it at once
    ("every 10s", None, "2026-11-27T12:00:30"),                    # never fired: due as beat starts
    ("*/15 * * * *", "2026-11-27T12:00:00", "2026-11-27T12:15:00"),
    ("*/15 * * * *", None, "2026-11-27T12:15:00"),                  # never fired: the next match
    ("0 9 * * 1-5", "2026-11-20T09:00:00", "2026-11-27T12:00:30"),  # missed ticks: one, now
    ("99 99 * * *", None, None),                                     # beat leaves it out
])
def test_next_run_is_when_beat_would_fire(spec, last_fired, expected):
    assert next_run(spec, utc(last_fired) if last_fired else None, NOW) == (utc(expected) if expected else None)


@pytest.mark.parametrize("spec", ["99 99 * * *", "hourly-ish", "* * * *", "0 0 32 * *", "0 0 * 13 *", "* * * * * *"])
def test_a_bad_schedule_is_a_declaration_error(tmp_path, spec):
    (tmp_path / "sources.toml").write_text(f'[sources.x]\ntype = "file"\npath = "a.csv"\nschedule = "{spec}"\n')
    assert "field 'schedule'" in load_registry(tmp_path / "sources.toml").errors["x"]


def test_a_bad_cron_is_an_error_on_its_source_alone(client, write_sources, data_dir):
    write_sources('[sources.bad]\ntype = "file"\npath = "data/a.csv"\nschedule = "99 99 * * *"\n'
                  '[sources.good]\ntype = "file"\npath = "data/a.csv"\nschedule = "*/15 6-20 * * 1-5"\n'
                  '[sources.often]\ntype = "file"\npath = "data/a.csv"\nschedule = "every 30s"\n')
    bad = client.request("GET", "/sources/bad")["data"]
    assert bad["status"] == "invalid" and "99 99 * * *" in bad["sync_stats"]["last_error"]
    assert client.request("GET", "/sources/good")["data"]["schedule"] == "*/15 6-20 * * 1-5"
    entries = beat_schedule(get_settings())
    assert "ingest:bad" not in entries
    assert entries["ingest:good"]["schedule"] == cron("*/15 6-20 * * 1-5")
    assert entries["ingest:often"]["schedule"] == timedelta(seconds=30)
    assert {"jobs.reap", "webhooks.relay", "exports.expire"} <= set(entries)


def test_importing_the_worker_does_no_work(tmp_path):
    """Importing worker.app (as the API does) neither reads sources.toml nor starts a Redis."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("INGOT_REDIS_URL",)}
    env.update(INGOT_HOME=str(home), INGOT_SOURCES_FILE=str(tmp_path / "missing" / "sources.toml"))
    (tmp_path / "broken.toml").write_text("[sources.x\n")
    for sources in (tmp_path / "missing" / "sources.toml", tmp_path / "broken.toml"):
        env["INGOT_SOURCES_FILE"] = str(sources)
        done = subprocess.run([sys.executable, "-c", "import worker.app, api.main; api.main.create_app()"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert not home.exists() or not list(home.glob("redis*")), "importing started an embedded Redis"


def test_the_api_answers_with_a_broken_sources_file(client, write_sources):
    write_sources("[sources.x\n")
    assert client.request("GET", "/health")["data"]["status"] == "healthy"
    from cli.client import IngotError

    with pytest.raises(IngotError) as caught:
        client.request("GET", "/sources")
    assert "sources file cannot be read" in caught.value.message and "not valid TOML" in caught.value.message


def test_a_source_every_second_runs_repeatedly_and_never_overlaps(client, start_worker, write_sources, api):
    def slow(q, h):
        time.sleep(1.3)  # each run outlasts the 1 s period, so some ticks find it still running
        return as_json({"response": {"data": records(0, 5)}})

    api.routes["/slow"] = slow
    source = http_source("prices", f"{api.url}/slow", 'schedule = "every 1s"')
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
    shown = client.request("GET", "/sources/prices")["data"]
    fired, upcoming = (datetime.fromisoformat(shown[f]) for f in ("last_scheduled_at", "next_run_at"))
    assert fired >= runs[-1].started_at - timedelta(seconds=2) and upcoming >= fired + timedelta(seconds=1)
    assert upcoming <= datetime.now(UTC) + timedelta(seconds=2)  # every second: never far off
    assert shown["sync_stats"]["skipped"] >= skipped


def test_the_ingestion_interval_schedules_the_sources_without_a_schedule_of_their_own(
        client, start_worker, write_sources, api):
    """PUT /config's ingestion interval: every enabled source that declares no schedule runs that often
    (beat reads it as it starts: the answer says so); a source's own schedule, or its being disabled,
    wins. /sources shows the schedule each one runs on."""
    api.routes["/plain"] = lambda q, h: as_json({"response": {"data": records(0, 5)}})
    write_sources(http_source("plain", f"{api.url}/plain")
                  + http_source("own", f"{api.url}/plain", 'schedule = "0 0 1 1 *"')
                  + http_source("off", f"{api.url}/plain", "enabled = false"))
    assert client.request("GET", "/sources/plain")["data"]["schedule"] is None  # 0 by default: on request only
    try:
        changed = client.request("PUT", "/config", json={"ingestion_interval_seconds": 1})["data"]
        assert changed["config"]["ingestion_interval_seconds"] == 1
        assert "ingestion_interval_seconds" in changed["restart_required"]
        shown = {s: client.request("GET", f"/sources/{s}")["data"] for s in ("plain", "own", "off")}
        assert shown["plain"]["schedule"] == "every 1s" and shown["plain"]["next_run_at"] is not None
        assert shown["own"]["schedule"] == "0 0 1 1 *" and shown["off"]["schedule"] is None
        assert shown["off"]["next_run_at"] is None

        start_worker()

        def scheduled_runs():
            with get_engine().connect() as conn:
                return conn.execute(text(
                    "SELECT params->'sources' AS sources FROM jobs WHERE request_id = 'schedule' "
                    "AND state = 'succeeded'")).scalars().all()

        runs = wait_for(lambda: len(scheduled_runs()) >= 2 and scheduled_runs(), timeout=60, interval=0.3,
                        message="two runs of the unscheduled source on the ingestion interval")
        assert all(sources == ["plain"] for sources in runs)  # never "own" (not due) nor "off"
    finally:
        client.request("PUT", "/config", json={"ingestion_interval_seconds": 0})

