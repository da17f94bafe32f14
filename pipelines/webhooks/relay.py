"""The outbox relay: events become deliveries.

A job's end writes an event row in the same transaction (a trigger: see migration 0003). The relay
turns each new event into one delivery per subscribed endpoint that may see it (an export's events
only its owner's and admins'; none once the owner's key is revoked or expired), and claims every delivery that is due,
for the caller to attempt once its transaction commits.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from pipelines.core.settings import get_settings


def relay(session: Session) -> list[str]:
    """Fan new events out to their endpoints and claim every delivery that is due; returns the
    deliveries to send (after this transaction commits)."""
    session.execute(text(
        "WITH fresh AS (SELECT id, type, job_id FROM webhook_events WHERE dispatched_at IS NULL "
        "               ORDER BY created_at LIMIT 1000 FOR UPDATE SKIP LOCKED), "
        "     marked AS (UPDATE webhook_events e SET dispatched_at = now() FROM fresh WHERE e.id = fresh.id) "
        "INSERT INTO webhook_deliveries (id, webhook_id, event_id, state, attempts, next_attempt_at, created_at) "
        "SELECT 'dlv_' || md5(w.id || fresh.id), w.id, fresh.id, 'pending', 0, now(), now() "
        "FROM fresh JOIN jobs j ON j.id = fresh.job_id "
        "JOIN webhooks w ON w.enabled AND w.deleted_at IS NULL AND fresh.type = ANY(w.events) "
        "AND NOT ingot_owner_gone(w.api_key_id) AND ingot_sees_job(w.api_key_id, j.kind, j.api_key_id) "
        "ON CONFLICT DO NOTHING"
    ))
    return list(session.execute(text(
        "UPDATE webhook_deliveries SET next_attempt_at = NULL, claimed_until = now() + make_interval(secs => :c) "
        "WHERE id IN (SELECT id FROM webhook_deliveries WHERE state = 'pending' AND "
        "             (next_attempt_at <= now() OR (next_attempt_at IS NULL AND claimed_until < now())) "
        "             ORDER BY next_attempt_at NULLS FIRST LIMIT 5000 FOR UPDATE SKIP LOCKED) "
        "RETURNING id"
    ), {"c": get_settings().webhook_claim_seconds}).scalars())
