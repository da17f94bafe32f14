"""the outbox's NOTIFY names the new events

An insert of event rows notified `ingot_outbox` with an empty payload, so the listener that woke had
to look for new events: a scan of `ix_webhook_events_pending` from its start. Each event marked
dispatched leaves a dead entry there that scans beside constant writes cannot mark dead (the page
changes under them), so while jobs end every few milliseconds each such scan walked hundreds of
entries: the relay's read of new events, and the listener's read of when to wake, were most of the
buffers PostgreSQL touched for a job.

Now the payload is `events:` and the ids the statement inserted (comma-separated), so the listener
fans out those rows by primary key. A statement that inserts more than 100 events (or ids too long
for NOTIFY's 8,000 bytes) sends `sweep` instead: look for them all. A delivery given a time still sends an empty payload (claim, nothing to
fan out). As before, a transaction that has set `ingot.relaying` is quiet.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-04 09:30:00
"""

from alembic import op

revision = '0025'
down_revision = '0024'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE FUNCTION ingot_outbox_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
    size bigint;
    ids text;
BEGIN
    IF current_setting('ingot.relaying', true) IS DISTINCT FROM 'on' THEN
        SELECT count(*), sum(length(id) + 1), string_agg(id, ',') INTO n, size, ids
        FROM (SELECT id FROM inserted LIMIT 101) AS named;
        IF n > 100 OR size > 7900 THEN
            PERFORM pg_notify('ingot_outbox', 'sweep');
        ELSIF n > 0 THEN
            PERFORM pg_notify('ingot_outbox', 'events:' || ids);
        END IF;
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER webhook_events_notify ON webhook_events;
CREATE TRIGGER webhook_events_notify AFTER INSERT ON webhook_events REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION ingot_outbox_events_notify();
""")


def downgrade() -> None:
    op.execute("""
DROP TRIGGER webhook_events_notify ON webhook_events;
CREATE TRIGGER webhook_events_notify AFTER INSERT ON webhook_events
    FOR EACH STATEMENT EXECUTE FUNCTION ingot_outbox_notify();
DROP FUNCTION ingot_outbox_events_notify();
""")
