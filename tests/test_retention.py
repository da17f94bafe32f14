"""Retention: what is older than the setting goes, beat runs it, and no Prometheus counter goes
backwards for it (what was deleted is kept in `retired_totals`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import func, select

from pipelines.core.db import session_scope
from pipelines.core.models import (
    DeliveryAttempt,
    Event,
    Job,
    QuarantineRow,
    WebhookDelivery,
    WebhookEvent,
)
from pipelines.core.settings import get_settings
from pipelines.jobs import retention, status
from worker.schedule import beat_schedule

NOW = datetime.now(UTC)
OLD, RECENT = NOW - timedelta(days=40), NOW - timedelta(days=1)


def _job(kind: str, state: str, finished: datetime, seconds: float) -> Job:
    return Job(kind=kind, state=state, params={}, timeout_seconds=60,
               started_at=finished - timedelta(seconds=seconds), finished_at=finished, created_at=finished)


def _seed() -> dict[str, str]:
    with session_scope() as s:
        jobs = {"old_ok": _job("ingestion", "succeeded", OLD, 3), "old_failed": _job("export", "failed", OLD, 100),
                "old_run": _job("scenario_run", "succeeded", OLD, 2),
                "recent": _job("ingestion", "succeeded", RECENT, 7)}
        s.add_all(jobs.values())
        s.flush()
        s.add_all([Event(event="x", message="old", created_at=OLD), Event(event="x", message="new", created_at=RECENT)])
        s.add(WebhookEvent(id="evt_old", type="ingestion.completed", job_id=jobs["old_ok"].id, created_at=OLD,
                           dispatched_at=OLD))
        s.add(WebhookDelivery(id="dlv_old", webhook_id="wh_1", event_id="evt_old", state="succeeded", attempts=2,
                              created_at=OLD, completed_at=OLD))
        s.add_all([DeliveryAttempt(delivery_id="dlv_old", attempt=1, attempted_at=OLD, status_code=503),
                   DeliveryAttempt(delivery_id="dlv_old", attempt=2, attempted_at=OLD, status_code=200)])
        s.add_all([QuarantineRow(source="s", file="f.csv", line=2, reason="bad", raw={}, raw_hash="a", resolved_at=OLD),
                   QuarantineRow(source="s", file="f.csv", line=3, reason="bad", raw={}, raw_hash="b")])
        return {name: job.id for name, job in jobs.items()}


def test_old_records_go_and_the_counters_stay(api_url):
    ids = _seed()
    before = status.counts()
    deleted = retention.purge(days=30)
    assert deleted["jobs"] == 2 and deleted["events"] == 1 and deleted["webhook_deliveries"] == 1
    assert deleted["quarantine"] == 1
    with session_scope() as s:
        left = set(s.scalars(select(Job.id)))
        assert left == {ids["old_run"], ids["recent"]}  # a scenario run stays with its scenario
        assert s.scalar(select(func.count()).select_from(Event)) == 1
        assert s.scalar(select(func.count()).select_from(DeliveryAttempt)) == 0
        assert s.scalar(select(func.count()).select_from(WebhookEvent)) == 0
        assert s.scalar(select(QuarantineRow.line)) == 3
    after = status.counts()
    assert after.jobs == before.jobs and after.attempts == before.attempts == {"success": 1, "http_503": 1}
    assert after.durations == before.durations
    assert after.durations["export"].buckets[60.0] == 0 and after.durations["export"].buckets[300.0] == 1
    assert after.deleted["jobs"] == 2 and after.deleted["webhook_attempts"] == 2
    text = httpx.get(f"{api_url}/metrics").text  # the collector reads at most every few seconds: look for the name
    assert "ingot_retention_deleted_rows" in text and "ingot_job_duration_seconds" in text
    assert retention.purge(days=30) == {k: 0 for k in deleted}  # nothing more to do


def test_zero_days_keeps_everything():
    _seed()
    assert retention.purge(days=0) == {}


def test_beat_runs_retention():
    entry = beat_schedule(get_settings())["retention.purge"]
    assert entry["task"] == "retention.purge" and entry["schedule"] == get_settings().retention_interval_seconds
