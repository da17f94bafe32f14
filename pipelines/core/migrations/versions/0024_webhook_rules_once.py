"""two webhook rules written once, as SQL functions the relay, the outbox listener and each attempt share

- `ingot_endpoint_proven(webhooks)`: an endpoint that has proven it answers: it answered once, has not
  failed since its last answer, and is not paused. Such an endpoint gets all of its due deliveries at
  once; any other (new, failing, paused) gets one or two at a time, and an answer from it changes the
  endpoint. The claim, the listener's next-due read, the claim's report of which endpoints are yet
  to prove themselves, and the record of an answer all ask this one function.
- `ingot_due_deliveries(endpoint, most)`: an endpoint's pending deliveries that may go out now, at most
  MOST of each sort: those whose claim ran out (first, `at` NULL), then the oldest due retries. Read
  off `ix_deliveries_endpoint_due`, the endpoint's own part of it, however long its backlog.

Plain SQL functions, so the planner inlines them into the statements that call them.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-04 07:10:00
"""

from alembic import op

revision = '0024'
down_revision = '0023'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE FUNCTION ingot_endpoint_proven(w webhooks) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT w.consecutive_failures = 0 AND w.paused_at IS NULL AND w.answered_at IS NOT NULL
$$;
CREATE FUNCTION ingot_due_deliveries(endpoint text, most bigint) RETURNS TABLE (id text, at timestamptz)
LANGUAGE sql STABLE AS $$
    (SELECT d.id, NULL::timestamptz FROM webhook_deliveries d
     WHERE d.webhook_id = endpoint AND d.state = 'pending' AND d.next_attempt_at IS NULL AND d.claimed_until < now()
     LIMIT most)
    UNION ALL
    (SELECT d.id, d.next_attempt_at FROM webhook_deliveries d
     WHERE d.webhook_id = endpoint AND d.state = 'pending' AND d.next_attempt_at <= now()
     ORDER BY d.next_attempt_at, d.id LIMIT most)
$$;
""")


def downgrade() -> None:
    op.execute("DROP FUNCTION ingot_due_deliveries(text, bigint); DROP FUNCTION ingot_endpoint_proven(webhooks)")
