"""quarantine holds each bad row once

An entry is identified by source, file, line and a hash of its raw content (the jsonb text form,
which PostgreSQL writes canonically). A run that meets it again counts the sighting; a run that finds
the line good, or changed, marks it resolved. `quarantine_sightings` records which runs met which
entry, so `?job_id=` still lists what one run met.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 14:40:00
"""

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

def upgrade() -> None:
    op.execute("ALTER TABLE quarantine ADD COLUMN raw_hash text, ADD COLUMN last_seen_job_id text, "
               "ADD COLUMN times_seen integer NOT NULL DEFAULT 1, ADD COLUMN resolved_at timestamptz, "
               "ADD COLUMN resolved_by_job_id text")
    op.execute("UPDATE quarantine SET raw_hash = encode(sha256(convert_to(raw::text, 'UTF8')), 'hex'), "
               "last_seen_job_id = job_id")
    op.execute("CREATE TABLE quarantine_sightings (job_id text NOT NULL, quarantine_id bigint NOT NULL "
               "REFERENCES quarantine (id) ON DELETE CASCADE, seen_at timestamptz NOT NULL DEFAULT now(), "
               "PRIMARY KEY (job_id, quarantine_id))")
    op.execute("CREATE INDEX ix_quarantine_sightings_entry ON quarantine_sightings (quarantine_id)")
    # Copies made by earlier re-runs fold into their first entry, every run's sighting kept.
    op.execute(
        "WITH ranked AS (SELECT id, job_id, created_at, "
        "  first_value(id) OVER w AS keep, count(*) OVER w AS seen, last_value(job_id) OVER w AS last_job "
        "  FROM quarantine WINDOW w AS (PARTITION BY source, file, line, raw_hash ORDER BY id "
        "                               ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)), "
        "sighted AS (INSERT INTO quarantine_sightings (job_id, quarantine_id, seen_at) "
        "  SELECT job_id, keep, created_at FROM ranked WHERE job_id IS NOT NULL ON CONFLICT DO NOTHING), "
        "counted AS (UPDATE quarantine q SET times_seen = r.seen, last_seen_job_id = r.last_job "
        "  FROM ranked r WHERE q.id = r.id AND r.id = r.keep) "
        "DELETE FROM quarantine q USING ranked r WHERE q.id = r.id AND r.id <> r.keep"
    )
    op.execute("ALTER TABLE quarantine ALTER COLUMN raw_hash SET NOT NULL")
    op.execute("DROP INDEX uq_quarantine_line")
    op.execute("CREATE UNIQUE INDEX uq_quarantine_entry ON quarantine (source, file, line, raw_hash) NULLS NOT DISTINCT")
    op.execute("CREATE INDEX ix_quarantine_unresolved ON quarantine (source, id) WHERE resolved_at IS NULL")


def downgrade() -> None:
    op.execute("DROP INDEX ix_quarantine_unresolved")
    op.execute("DROP INDEX uq_quarantine_entry")
    op.execute("DROP TABLE quarantine_sightings")
    op.execute("ALTER TABLE quarantine DROP COLUMN raw_hash, DROP COLUMN last_seen_job_id, DROP COLUMN times_seen, "
               "DROP COLUMN resolved_at, DROP COLUMN resolved_by_job_id")
    op.execute("CREATE UNIQUE INDEX uq_quarantine_line ON quarantine (job_id, source, file, line)")
