"""pending deliveries by endpoint

The relay hands an endpoint that has yet to prove it answers (new, failing, paused) one or two
deliveries at a time, and the outbox listener asks when the next one falls due. Both read a pending
delivery by its endpoint and time: without this index each of them ranked or scanned every pending
delivery of every such endpoint at every wake, so a bad endpoint's growing backlog made every relay
slower, everyone's deliveries included (bench/webhooks.py, its neighbours phase).

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-04 05:10:00
"""

from alembic import op

revision = '0023'
down_revision = '0022'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX ix_deliveries_endpoint_due ON webhook_deliveries (webhook_id, next_attempt_at, id) "
               "WHERE state = 'pending'")


def downgrade() -> None:
    op.execute("DROP INDEX ix_deliveries_endpoint_due")
