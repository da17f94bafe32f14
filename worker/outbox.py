"""The relay's wake-up: a thread in every webhooks worker that LISTENs on the outbox.

A job's end event is committed with a NOTIFY (migration 0008); this thread wakes on it, or when the
earliest pending retry falls due, and relays: new events become deliveries, due deliveries are sent
to the webhooks queue. Nothing polls every few seconds, so Flower and the console show people's
work rather than housekeeping. Beat's `webhooks.relay` stays as a safety net (tens of seconds)
should a notification be missed while the connection was down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg

from pipelines.core.db import dead_peer_args, get_engine
from pipelines.core.settings import get_settings
from pipelines.webhooks import relay

log = logging.getLogger(__name__)
_MIN_WAIT = 0.05


def _libpq_url() -> str:
    return get_engine().url.set(drivername="postgresql").render_as_string(hide_password=False)


# The earliest moment a delivery may be handed out: for each endpoint that is not paused, its
# earliest retry or claim running out, read off ix_deliveries_endpoint_due and ix_deliveries_in_flight
# (migration 0028) whatever its backlog; else
# a paused endpoint's probe (its other deliveries wait for the probe's answer, not for
# the clock). An endpoint yet to prove it answers (new or failing) has one or two in flight at a time:
# the rest of its due backlog waits for their answers, whose record wakes the relay (`delivery._record`),
# not for the clock, so only its retries still to come count here. (New events are not read here:
# the NOTIFYs that name them wake the listener, and a look that finds a full batch looks again.)
_NEXT_DUE = """
SELECT least(
    (SELECT min(least(retry.at, claim.until)) FROM webhooks w
     LEFT JOIN LATERAL (
        SELECT d.next_attempt_at AS at FROM webhook_deliveries d
        WHERE d.webhook_id = w.id AND d.state = 'pending'
          AND d.next_attempt_at > CASE WHEN ingot_endpoint_proven(w) THEN '-infinity'::timestamptz ELSE now() END
        ORDER BY d.next_attempt_at LIMIT 1) retry ON true
     CROSS JOIN LATERAL (
        SELECT min(d.claimed_until) AS until FROM webhook_deliveries d
        WHERE d.webhook_id = w.id AND d.state = 'pending' AND d.next_attempt_at IS NULL) claim
     WHERE w.paused_at IS NULL),
    (SELECT min(w.probe_at) FROM webhooks w WHERE w.paused_at IS NOT NULL
       AND EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.webhook_id = w.id AND d.state = 'pending')
       AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.webhook_id = w.id AND d.state = 'pending'
                       AND d.next_attempt_at IS NULL AND d.claimed_until >= now())))
"""


def _seconds_to_next_due(conn: psycopg.Connection, ceiling: float) -> float:
    """How long until the earliest pending delivery falls due (or a claim on one runs out)."""
    due = conn.execute(_NEXT_DUE).fetchone()[0]  # type: ignore[index]  # an aggregate always returns one row
    if due is None:
        return ceiling
    return min(max((due - datetime.now(UTC)).total_seconds(), _MIN_WAIT), ceiling)


def _woken_by(conn: psycopg.Connection, wait: float, sweep_at: float) -> list[str] | None:
    """Wait up to WAIT seconds for the outbox to speak; then the new events its NOTIFYs named (none:
    only deliveries to claim), or None to look for new events itself, a batch at a time: a NOTIFY said
    `sweep`, they named more than a batch (one transaction ended thousands of jobs, say), or the wait
    ran out at or past SWEEP_AT (`time.monotonic()`: the safety net for a notification missed). A wait
    that ran out sooner was for a retry falling due: only its claim, no look through the pending index."""
    heard = [*conn.notifies(timeout=wait, stop_after=1), *conn.notifies(timeout=0)]
    if not heard:
        return None if time.monotonic() >= sweep_at else []
    events: list[str] = []
    for notify in heard:
        kind, _, ids = notify.payload.partition(":")
        if kind == "events":
            events.extend(ids.split(","))
        elif notify.payload:
            return None
    return events if len(events) <= relay.FAN_OUT_BATCH else None


class OutboxListener(threading.Thread):
    """Relay whenever the outbox says so, or a retry falls due; reconnect if the database goes away.

    It relays on its own connection (the one it LISTENs on), in autocommit and quiet for the
    connection's life: a relay is two statements and the read of when to wake next one more, with no
    checkout, ping, BEGIN or COMMIT around them. It fans out the events the NOTIFYs that woke it name,
    by key; it looks for every new event when it connects (notifications sent meanwhile are lost), when
    a NOTIFY asks it to, while a look finds a full batch, and once a relay interval has passed without
    one (a retry falling due wakes it to claim, not to look). SEND gets the deliveries each relay claimed."""

    def __init__(self, send: Callable[[list[tuple[str, str, bool]]], object]):
        super().__init__(name="outbox-listener", daemon=True)
        self.send = send
        self.halt = threading.Event()

    def run(self) -> None:
        ceiling = get_settings().webhook_relay_interval_seconds
        while not self.halt.is_set():
            try:
                url = _libpq_url()
                with psycopg.connect(url, autocommit=True, **dead_peer_args(url)) as conn:
                    conn.execute(f"LISTEN {relay.CHANNEL}")
                    # Quiet: what it leaves due is read next, and its own NOTIFYs would only wake it again.
                    relay.make_quiet(conn)
                    events: list[str] | None = None  # the first look, on connecting, is for every new event
                    while not self.halt.is_set():
                        if events is None:
                            sweep_at = time.monotonic() + ceiling
                        more = relay.fan_out(conn, events) >= relay.FAN_OUT_BATCH and events is None
                        self.send(relay.claim(conn))
                        if more:
                            continue
                        wait = _seconds_to_next_due(conn, max(sweep_at - time.monotonic(), _MIN_WAIT))
                        events = _woken_by(conn, wait, sweep_at)
            except psycopg.Error as exc:
                log.warning("outbox listener lost the database (%s); retrying", exc)
                self.halt.wait(min(ceiling, 2.0))
            except Exception:  # the broker, say: this thread must outlive any one failure
                log.exception("outbox listener failed; retrying")
                self.halt.wait(min(ceiling, 2.0))

    def stop(self) -> None:
        self.halt.set()
