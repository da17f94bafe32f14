"""jobs: messages counted per kind, the reaper's marks; the kind alone names the queue

Each kind's messages are numbered by a sequence of its own (`send_seq`, taken again at every re-send),
so the reaper can tell from one number per queue which messages the broker has already handed out
(`pipelines.jobs.reaper`) instead of reading whole broker lists. The `queue` column goes: the kind
decides the queue (`worker.queues`).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 13:00:00
"""

from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

KINDS = ("ingestion", "export", "scenario_run")


def upgrade() -> None:
    for kind in KINDS:
        op.execute(f"CREATE SEQUENCE job_send_seq_{kind}")
    op.execute("""
ALTER TABLE jobs ADD COLUMN send_seq bigint;
-- Jobs waiting today are numbered in the order they were sent.
UPDATE jobs SET send_seq = numbered.n FROM (
    SELECT id, CASE kind WHEN 'ingestion' THEN nextval('job_send_seq_ingestion')
                         WHEN 'export' THEN nextval('job_send_seq_export')
                         ELSE nextval('job_send_seq_scenario_run') END AS n
    FROM (SELECT id, kind FROM jobs WHERE state = 'queued' ORDER BY sent_at) waiting) numbered
WHERE jobs.id = numbered.id;
CREATE INDEX ix_jobs_waiting ON jobs (kind, send_seq) WHERE state = 'queued';
ALTER TABLE jobs DROP COLUMN queue;
-- Per kind: the count of messages the broker had handed out at the reaper's last mark, and when.
CREATE TABLE job_queue_marks (
    kind text PRIMARY KEY,
    handed_out bigint NOT NULL,
    marked_at timestamptz NOT NULL
);
""")


def downgrade() -> None:
    op.execute("""
DROP TABLE job_queue_marks;
ALTER TABLE jobs ADD COLUMN queue text;
UPDATE jobs SET queue = CASE kind WHEN 'ingestion' THEN 'ingest' WHEN 'export' THEN 'export' ELSE 'scenarios' END;
ALTER TABLE jobs ALTER COLUMN queue SET NOT NULL;
DROP INDEX ix_jobs_waiting;
ALTER TABLE jobs DROP COLUMN send_seq;
""")
    for kind in KINDS:
        op.execute(f"DROP SEQUENCE job_send_seq_{kind}")
