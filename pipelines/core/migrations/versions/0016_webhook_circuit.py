"""webhooks: a circuit breaker per endpoint

An endpoint whose attempts keep failing or timing out is paused: its deliveries wait in their own
line, one probe at growing intervals tells when it answers again (`pipelines.webhooks.delivery`).
`answered_at` is an endpoint's first successful answer: until then it gets two deliveries at a time.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03 17:30:00
"""

from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
ALTER TABLE webhooks
    ADD COLUMN consecutive_failures integer NOT NULL DEFAULT 0,
    ADD COLUMN paused_at timestamptz,
    ADD COLUMN probe_at timestamptz,
    ADD COLUMN probes integer NOT NULL DEFAULT 0,
    ADD COLUMN answered_at timestamptz;
-- Endpoints that were already receiving have answered before.
UPDATE webhooks w SET answered_at = now()
WHERE EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.webhook_id = w.id AND d.state = 'succeeded');
""")


def downgrade() -> None:
    op.execute("ALTER TABLE webhooks DROP COLUMN answered_at, DROP COLUMN probes, DROP COLUMN probe_at, DROP COLUMN paused_at, "
               "DROP COLUMN consecutive_failures")
