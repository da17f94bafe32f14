"""Retention: records older than `retention_days` are deleted, and what the metrics count of them is kept.

Beat runs `purge()` every `INGOT_RETENTION_INTERVAL_SECONDS` (hourly by default). With a cutoff of
`retention_days` ago (`INGOT_RETENTION_DAYS`, 30 by default, changeable at run time; 0 keeps
everything), it deletes:

- finished ingestion and export jobs (their rows: the data they loaded stays, and the lineage column
  `job_id` of those rows then names a job that is no longer listed); scenario runs stay as long as
  their scenario, since they are its results;
- the event journal;
- webhook deliveries completed before the cutoff, their attempts, and the events they carried;
- quarantine entries resolved before the cutoff, and sightings older than it.

Prometheus counters must never go backwards, so in the same statement that deletes jobs or
attempts, their counts (jobs by kind and state, the duration histogram, attempts by outcome) are
added to `retired_totals`, which `pipelines.jobs.status.counts` adds to what it counts live. Rows
go in batches, each its own transaction, so a first purge of a large backlog never holds long locks.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from pipelines.core import runtime
from pipelines.core.db import get_engine

log = logging.getLogger(__name__)
BATCH = 5_000
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)

_JOBS = text("""
WITH gone AS (
    DELETE FROM jobs WHERE id IN (
        SELECT id FROM jobs WHERE finished_at < :cutoff AND kind <> 'scenario_run' ORDER BY finished_at LIMIT :batch)
    RETURNING kind, state, extract(epoch FROM finished_at - started_at)::float8 AS seconds
), counted AS (
    INSERT INTO retired_totals (metric, labels, value)
    SELECT metric, labels, sum(value) FROM (
        SELECT 'jobs' AS metric, ARRAY[kind, state] AS labels, count(*)::float8 AS value
            FROM gone GROUP BY kind, state
        UNION ALL SELECT 'job_duration_count', ARRAY[kind], count(*) FROM gone WHERE seconds IS NOT NULL GROUP BY kind
        UNION ALL SELECT 'job_duration_sum', ARRAY[kind], sum(seconds) FROM gone WHERE seconds IS NOT NULL GROUP BY kind
        UNION ALL SELECT 'job_duration_bucket', ARRAY[kind, bound::text], count(*)
            FROM gone CROSS JOIN unnest(CAST(:buckets AS float8[])) AS bound
            WHERE seconds <= bound GROUP BY kind, bound
        UNION ALL SELECT 'retention_deleted', ARRAY['jobs'], count(*) FROM gone
    ) AS retired GROUP BY metric, labels
    ON CONFLICT (metric, labels) DO UPDATE SET value = retired_totals.value + excluded.value
)
SELECT count(*) FROM gone
""")

_DELIVERIES = text("""
WITH batch AS (
    SELECT id FROM webhook_deliveries WHERE completed_at < :cutoff ORDER BY completed_at LIMIT :batch
), attempts AS (
    DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM batch)
    RETURNING ingot_attempt_outcome(status_code) AS outcome
), deliveries AS (
    DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM batch) RETURNING event_id
), counted AS (
    INSERT INTO retired_totals (metric, labels, value)
    SELECT metric, labels, sum(value) FROM (
        SELECT 'webhook_attempts' AS metric, ARRAY[outcome] AS labels, count(*)::float8 AS value
            FROM attempts GROUP BY outcome
        UNION ALL SELECT 'retention_deleted', ARRAY['webhook_attempts'], count(*) FROM attempts
        UNION ALL SELECT 'retention_deleted', ARRAY['webhook_deliveries'], count(*) FROM deliveries
    ) AS retired GROUP BY metric, labels
    ON CONFLICT (metric, labels) DO UPDATE SET value = retired_totals.value + excluded.value
)
SELECT count(*) FROM deliveries
""")

# The rest is deleted without counts beyond how many rows went.
_SIMPLE = {
    "events": "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created_at < :cutoff LIMIT :batch)",
    "webhook_events": (
        "DELETE FROM webhook_events WHERE id IN (SELECT e.id FROM webhook_events e WHERE e.dispatched_at IS NOT NULL "
        "AND e.created_at < :cutoff AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id) "
        "LIMIT :batch)"),
    "quarantine": ("DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine WHERE resolved_at < :cutoff "
                   "LIMIT :batch)"),
    "quarantine_sightings": (
        "DELETE FROM quarantine_sightings WHERE (job_id, quarantine_id) IN (SELECT job_id, quarantine_id "
        "FROM quarantine_sightings WHERE seen_at < :cutoff LIMIT :batch)"),
}
_COUNT_DELETED = text("""
INSERT INTO retired_totals (metric, labels, value) VALUES ('retention_deleted', ARRAY[CAST(:table AS text)], :n)
ON CONFLICT (metric, labels) DO UPDATE SET value = retired_totals.value + excluded.value
""")


def purge(now: datetime | None = None, days: int | None = None) -> dict[str, int]:
    """Delete what is older than DAYS (default: the `retention_days` setting) before NOW; returns how
    many rows went, by table."""
    days = runtime.value("retention_days") if days is None else days
    if days <= 0:
        return {}
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    params = {"cutoff": cutoff, "batch": BATCH, "buckets": list(DURATION_BUCKETS)}
    deleted = {"jobs": _drain(_JOBS, params), "webhook_deliveries": _drain(_DELIVERIES, params)}
    for table, statement in _SIMPLE.items():
        deleted[table] = _drain(text(statement), params, counted_as=table)
    if any(deleted.values()):
        log.info("retention: deleted what was older than %s days", days, extra={"deleted": deleted})
    return deleted


def _drain(statement, params: dict, counted_as: str | None = None) -> int:
    """Run STATEMENT (one batch) until a batch comes back short; each batch commits on its own."""
    total = 0
    while True:
        with get_engine().begin() as conn:
            result = conn.execute(statement, params)
            n = result.rowcount if counted_as else result.scalar_one()
            if counted_as and n:
                conn.execute(_COUNT_DELETED, {"table": counted_as, "n": n})
        total += n
        if n < BATCH:
            return total
