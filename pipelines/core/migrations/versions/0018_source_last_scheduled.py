"""source_state.last_scheduled_at: when beat last fired a source's schedule (run queued or skipped)

`GET /sources/{id}` and `ingot sources` show it, with the next time the schedule fires, computed
from it by the code beat uses (`pipelines.jobs.schedules`).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-03 21:00:00
"""

from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE source_state ADD COLUMN last_scheduled_at timestamptz")
    # What is known already: the last skipped tick, or the last scheduled run's creation.
    op.execute("""
UPDATE source_state s SET last_scheduled_at = GREATEST(s.last_skipped_at, (
    SELECT max(j.created_at) FROM jobs j WHERE j.request_id = 'schedule' AND s.source = ANY(j.sources)))
""")


def downgrade() -> None:
    op.execute("ALTER TABLE source_state DROP COLUMN last_scheduled_at")
