"""the webhook outbox wakes the relay

A new event row, or a delivery given a time to be tried, sends a NOTIFY on `ingot_outbox` (delivered
when its transaction commits), so the relay listening in each webhooks worker acts at once, or knows
when to wake, instead of polling.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 15:20:00
"""

from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE FUNCTION ingot_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ingot_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER webhook_events_notify AFTER INSERT ON webhook_events
    FOR EACH STATEMENT EXECUTE FUNCTION ingot_outbox_notify();
-- A delivery given a time to be tried (new, a retry, a redelivery) wakes the relay too, so it can
-- wait for that time; claims clear the time and wake nobody. Notifications repeated in one
-- transaction are sent once.
CREATE TRIGGER webhook_deliveries_notify AFTER INSERT OR UPDATE OF next_attempt_at ON webhook_deliveries
    FOR EACH ROW WHEN (NEW.next_attempt_at IS NOT NULL) EXECUTE FUNCTION ingot_outbox_notify();
""")


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS webhook_deliveries_notify ON webhook_deliveries")
    op.execute("DROP TRIGGER IF EXISTS webhook_events_notify ON webhook_events")
    op.execute("DROP FUNCTION IF EXISTS ingot_outbox_notify()")
