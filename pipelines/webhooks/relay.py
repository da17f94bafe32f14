"""The outbox relay: events become deliveries.

A job's end writes an event row in the same transaction (a trigger: see migration 0003). The relay
turns each new event into one delivery per subscribed endpoint that may see it (an export's events
only its owner's and admins'; none once the owner's key is revoked or expired), and claims the
deliveries that are due (as many as each endpoint may have in flight: see _CLAIM), for the caller to
attempt once its transaction commits.
"""

from __future__ import annotations

import psycopg

from pipelines.core.settings import get_settings

# Event rows, deliveries given a time, and answers that change an endpoint's standing NOTIFY here
# (migrations 0008, 0022 and 0025; `delivery._record`): the outbox listener (worker.outbox) wakes on
# it. The payload: `events:` and the new events' ids, comma-separated; `sweep` (new events, too many
# to name); or empty (no new event: a delivery to claim, or an endpoint's standing changed).
CHANNEL = "ingot_outbox"


def relay(conn: psycopg.Connection, per_endpoint: int | None = None) -> list[tuple[str, str, bool]]:
    """Fan every new event out to its endpoints and claim every delivery that is due; returns the
    deliveries to send (once CONN's transaction, if it is in one, commits): see `claim`.

    Two statements, each whole on its own: on a connection in autocommit (the outbox listener's) they
    need no transaction around them."""
    fan_out(conn)
    return claim(conn, per_endpoint)


def fan_out(conn: psycopg.Connection, events: list[str] | None = None) -> int:
    """Turn new events into deliveries, one per subscribed endpoint that may see the event: EVENTS by
    id (those a NOTIFY named: migration 0025), or, when None, the oldest FAN_OUT_BATCH of any not yet
    dispatched. Returns how many events it took: FAN_OUT_BATCH means more may wait."""
    if events is None:
        return conn.execute(_FAN_OUT_OLDEST).fetchone()[0]  # type: ignore[index]  # a count: one row
    if not events:
        return 0
    # Planned afresh each time (not a prepared statement): a plan kept from when the table was small (a
    # new install, its listener's first relays) reads every event to find a few, until an ANALYZE.
    return conn.execute(_FAN_OUT_THESE, {"events": events}, prepare=False).fetchone()[0]  # type: ignore[index]


def claim(conn: psycopg.Connection, per_endpoint: int | None = None) -> list[tuple[str, str, bool]]:
    """Claim the deliveries that are due, as many as each endpoint may have in flight (see _CLAIM):
    (delivery, endpoint, whether the endpoint is failing lately or has yet to answer, so that its
    deliveries travel apart from those of endpoints known to answer: a batch waits up to
    INGOT_WEBHOOK_HAND_OFF_SECONDS for a receiver that hangs, and a new endpoint may be one).
    PER_ENDPOINT: how many may be in flight to an endpoint that has not answered yet
    (NEW_ENDPOINT_CONCURRENCY)."""
    return [tuple(row) for row in conn.execute(_CLAIM, {"c": get_settings().webhook_claim_seconds,
                                                        "new_endpoint": per_endpoint or NEW_ENDPOINT_CONCURRENCY})]


def make_quiet(conn: psycopg.Connection) -> None:
    """The deliveries relayed on CONN from now on send no NOTIFY (migration 0022): for the outbox
    listener, which reads when the next one falls due itself after each relay, rather than be woken
    by its own work. Every other writer of events or deliveries still wakes it."""
    conn.execute("SET ingot.relaying = 'on'")


FAN_OUT_BATCH = 1000

# New events, each marked dispatched and turned into a delivery for every endpoint that subscribes to
# it and may see it, in one statement that returns how many events it took. Which events: those a
# NOTIFY named, by primary key (and not `dispatched_at IS NULL` in the same WHERE, or the planner
# reads them off the partial index); or the oldest, off ix_webhook_events_pending, whose dead entries
# (one for each event dispatched since the last vacuum) such a scan walks: the sweep, not the rule.
_FAN_OUT = """
WITH locked AS (
    SELECT id, type, job_id, dispatched_at FROM webhook_events WHERE {which} FOR UPDATE SKIP LOCKED
), fresh AS (  -- as locked: the latest version of each row, whatever a scan saw before it waited
    SELECT id, type, job_id FROM locked WHERE dispatched_at IS NULL
), marked AS (
    UPDATE webhook_events e SET dispatched_at = now() FROM fresh WHERE e.id = fresh.id
), delivered AS (
    INSERT INTO webhook_deliveries (id, webhook_id, event_id, state, attempts, next_attempt_at, created_at)
    SELECT 'dlv_' || md5(w.id || fresh.id), w.id, fresh.id, 'pending', 0, now(), now()
    FROM fresh JOIN jobs j ON j.id = fresh.job_id
    JOIN webhooks w ON w.enabled AND w.deleted_at IS NULL AND fresh.type = ANY(w.events)
        AND NOT ingot_owner_gone(w.api_key_id) AND ingot_sees_job(w.api_key_id, j.kind, j.api_key_id)
    ON CONFLICT DO NOTHING
)
SELECT count(*) FROM fresh
"""
_FAN_OUT_THESE = _FAN_OUT.format(which="id = ANY(%(events)s)")
_FAN_OUT_OLDEST = _FAN_OUT.format(which=f"dispatched_at IS NULL ORDER BY created_at LIMIT {FAN_OUT_BATCH}")


NEW_ENDPOINT_CONCURRENCY = 2  # in flight to an endpoint that has not answered yet

# Which due deliveries to hand out now, the oldest first. An endpoint that has proven it answers
# (`ingot_endpoint_proven`, migration 0024) gets all of its own; one that has never answered gets
# `new_endpoint` at a time, one failing a single one, and one paused only its probe, once the probe
# falls due: a bad endpoint's backlog waits in its own line, behind no one else's. Each endpoint's due
# deliveries are read by `ingot_due_deliveries` off its own part of ix_deliveries_endpoint_due (retries)
# and ix_deliveries_in_flight (claims that ran out; and its flight counted, if capped), so no
# endpoint's backlog is read for another's sake (nor, in worker.outbox, to learn when the next falls due).
_CLAIM = """
WITH capped AS (
    SELECT id, CASE WHEN paused_at IS NOT NULL THEN CASE WHEN probe_at <= now() THEN 1 ELSE 0 END
                    WHEN consecutive_failures > 0 THEN 1
                    ELSE %(new_endpoint)s END AS most
    FROM webhooks w WHERE NOT ingot_endpoint_proven(w)
), free AS (  -- every other endpoint's due deliveries: a capped endpoint's backlog, however long, is not read
    SELECT due.id FROM webhooks w CROSS JOIN LATERAL ingot_due_deliveries(w.id, 5000) due
    WHERE w.id NOT IN (SELECT id FROM capped)
    ORDER BY due.at NULLS FIRST LIMIT 5000
), held AS (  -- each capped endpoint's first few, those whose claim ran out first
    SELECT first.id FROM capped c
    CROSS JOIN LATERAL (  -- its own in flight, off its own part of the index (not everyone's in flight)
        SELECT count(*) AS n FROM webhook_deliveries d
        WHERE d.webhook_id = c.id AND d.state = 'pending' AND d.next_attempt_at IS NULL AND d.claimed_until >= now()
    ) busy
    CROSS JOIN LATERAL (
        SELECT due.id FROM ingot_due_deliveries(c.id, greatest(c.most - busy.n, 0)) due
        ORDER BY due.at NULLS FIRST, due.id LIMIT greatest(c.most - busy.n, 0)
    ) first
), chosen AS (
    SELECT id FROM free UNION ALL SELECT id FROM held
), locked AS (  -- by key, as an array: the planner cannot tell how few they are, and would scan the table
    SELECT id FROM webhook_deliveries WHERE id = ANY(ARRAY(SELECT id FROM chosen)) FOR UPDATE SKIP LOCKED
)
UPDATE webhook_deliveries d SET next_attempt_at = NULL, claimed_until = now() + make_interval(secs => %(c)s)
FROM webhooks w
WHERE d.id = ANY(ARRAY(SELECT id FROM locked)) AND w.id = d.webhook_id
RETURNING d.id, d.webhook_id, NOT ingot_endpoint_proven(w)
"""
