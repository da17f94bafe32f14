"""Retention (counts of what was deleted kept for the metrics) and per-key rate limits

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29 22:40:00
"""

from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE retired_totals (
    metric text NOT NULL,
    labels text[] NOT NULL,
    value double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (metric, labels)
);
-- How the metrics label a webhook attempt, and a finished job's run time: said once, here.
CREATE FUNCTION ingot_attempt_outcome(status_code integer) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN status_code BETWEEN 200 AND 299 THEN 'success'
                WHEN status_code IS NULL THEN 'error' ELSE 'http_' || status_code END
$$;
CREATE VIEW job_run_times AS
    SELECT kind, state, extract(epoch FROM finished_at - started_at)::float8 AS seconds
    FROM jobs WHERE finished_at IS NOT NULL AND started_at IS NOT NULL;
CREATE INDEX ix_jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX ix_deliveries_completed ON webhook_deliveries (completed_at) WHERE completed_at IS NOT NULL;
CREATE INDEX ix_webhook_events_dispatched ON webhook_events (created_at) WHERE dispatched_at IS NOT NULL;
CREATE INDEX ix_quarantine_resolved ON quarantine (resolved_at) WHERE resolved_at IS NOT NULL;
ALTER TABLE api_keys ADD COLUMN rate_limit_per_minute integer
    CHECK (rate_limit_per_minute IS NULL OR rate_limit_per_minute > 0);
""")


def downgrade() -> None:
    op.execute("ALTER TABLE api_keys DROP COLUMN rate_limit_per_minute; DROP INDEX ix_quarantine_resolved; "
               "DROP INDEX ix_webhook_events_dispatched; DROP INDEX ix_deliveries_completed; "
               "DROP INDEX ix_jobs_finished; DROP TABLE retired_totals; DROP VIEW job_run_times; "
               "DROP FUNCTION ingot_attempt_outcome(integer)")
