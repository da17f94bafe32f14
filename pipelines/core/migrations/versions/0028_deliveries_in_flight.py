"""deliveries in flight, by endpoint and claim

A delivery handed out is in flight (`next_attempt_at` NULL) until its answer is recorded or its claim
runs out (`claimed_until`). Three reads look for those of one endpoint: a relay's claim, for the ones
whose claim ran out (to hand them out again) and, for an endpoint held to a few at a time, how many are
still flying; and the outbox listener, for when the next claim runs out. Off `ix_deliveries_endpoint_due`
each of them read every delivery in flight to the endpoint to find those few, at every relay: 3,000
index entries for an endpoint sent 3,000 at once, read again by every relay until they were answered.
Off this index each reads only what it asks for. So that no plan reads them elsewhere, whatever the
statistics say: `ix_deliveries_endpoint_due` now holds only the deliveries given a time (the due
retries it is read for), and `ix_deliveries_due` (every pending delivery by time, read by no statement
since 0023 but by a planner counting an endpoint's flight off it: 12,000 entries a relay in
bench/webhooks.py) is dropped.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-05 03:50:00
"""

from alembic import op

revision = '0028'
down_revision = '0027'
branch_labels = None
depends_on = None


# `ingot_due_deliveries` (migration 0024) with those whose claim ran out in the order they ran out: an
# order only the new index gives, so the planner takes it whatever its statistics say.
_DUE = """
CREATE OR REPLACE FUNCTION ingot_due_deliveries(endpoint text, most bigint) RETURNS TABLE (id text, at timestamptz)
LANGUAGE sql STABLE AS $$
    (SELECT d.id, NULL::timestamptz FROM webhook_deliveries d
     WHERE d.webhook_id = endpoint AND d.state = 'pending' AND d.next_attempt_at IS NULL AND d.claimed_until < now()
     {order}LIMIT most)
    UNION ALL
    (SELECT d.id, d.next_attempt_at FROM webhook_deliveries d
     WHERE d.webhook_id = endpoint AND d.state = 'pending' AND d.next_attempt_at <= now()
     ORDER BY d.next_attempt_at, d.id LIMIT most)
$$;
"""


_BY_ENDPOINT = "CREATE INDEX ix_deliveries_endpoint_due ON webhook_deliveries (webhook_id, next_attempt_at, id) "


def upgrade() -> None:
    op.execute("CREATE INDEX ix_deliveries_in_flight ON webhook_deliveries (webhook_id, claimed_until) "
               "WHERE state = 'pending' AND next_attempt_at IS NULL")
    op.execute("DROP INDEX ix_deliveries_endpoint_due")
    op.execute(_BY_ENDPOINT + "WHERE state = 'pending' AND next_attempt_at IS NOT NULL")
    op.execute("DROP INDEX ix_deliveries_due")
    op.execute(_DUE.format(order="ORDER BY d.claimed_until "))


def downgrade() -> None:
    op.execute(_DUE.format(order=""))
    op.execute("CREATE INDEX ix_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending'")
    op.execute("DROP INDEX ix_deliveries_endpoint_due")
    op.execute(_BY_ENDPOINT + "WHERE state = 'pending'")
    op.execute("DROP INDEX ix_deliveries_in_flight")
