"""the relay's own deliveries wake nobody

Every delivery the relay creates is given a time to be tried (now), and the outbox trigger sent a
NOTIFY for it: the listener that had just relayed was woken by its own work and relayed again, finding
nothing (two relays, six statements, for each committed event). A transaction that has set
`ingot.relaying` (the listener's relay, which reads when to wake next right after) is quiet; every
other writer of events or deliveries still wakes the relay.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-04 04:50:00
"""

from alembic import op

revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE OR REPLACE FUNCTION ingot_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('ingot.relaying', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('ingot_outbox', '');
    END IF;
    RETURN NULL;
END $$;
""")


def downgrade() -> None:
    op.execute("""
CREATE OR REPLACE FUNCTION ingot_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ingot_outbox', '');
    RETURN NULL;
END $$;
""")
