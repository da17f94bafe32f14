"""One signed delivery attempt, recorded, and the retry schedule after it.

Bodies are signed per Standard Webhooks, with a `webhook-id` that stays the same across retries and
redeliveries so receivers can de-duplicate, and each carries the event's timestamp so receivers can
order deliveries that arrive concurrently. An endpoint failing for longer than
`INGOT_WEBHOOK_DISABLE_AFTER_SECONDS`, or answering 410 Gone, is disabled.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import httpx
from sqlalchemy import text
from sqlalchemy.orm import Session
from standardwebhooks import Webhook as Signer

from pipelines.core import netguard, runtime
from pipelines.core.clock import utc_z
from pipelines.core.db import session_scope
from pipelines.core.retry import retry_after
from pipelines.core.settings import get_settings
from pipelines.webhooks.endpoints import decrypt

log = logging.getLogger(__name__)

EXCERPT_CHARS = 1000
EXCERPT_BYTES = 4 * EXCERPT_CHARS  # enough for EXCERPT_CHARS characters of UTF-8
RETRY_AFTER_CAP = 24 * 3600  # a receiver may ask for a day's pause, no more


@lru_cache(maxsize=1024)
def _signer(secret_encrypted: str) -> Signer:
    return Signer(decrypt(secret_encrypted))


def body_of(event) -> str:
    return json.dumps({"type": event.type, "timestamp": utc_z(event.created_at), "data": event.payload},
                      separators=(",", ":"))


def _post(client: httpx.Client, url: str, address: str, body: str, headers: dict, deadline: float
          ) -> tuple[httpx.Response, str]:
    """POST to the checked ADDRESS, presenting URL's host (Host header and TLS name) to the server.

    The answer is streamed and dropped after a short excerpt, never decompressed, and read no longer
    than DEADLINE (monotonic): a receiver cannot hand back a gzip bomb or trickle bytes forever."""
    target = httpx.URL(url)
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    host_header = target.host if target.port is None else f"{target.host}:{target.port}"
    with client.stream("POST", target.copy_with(host=address), content=body.encode(), extensions=extensions,
                       headers={**headers, "Host": host_header, "Accept-Encoding": "identity"}) as response:
        return response, _excerpt(response, deadline)


def _excerpt(response: httpx.Response, deadline: float) -> str:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return f"({encoding}-encoded answer, not decoded)"
    kept = bytearray()
    for chunk in response.iter_raw():  # each piece as it arrives, so the deadline is looked at between them
        kept += chunk
        if len(kept) >= EXCERPT_BYTES or time.monotonic() > deadline:
            break
    return kept[:EXCERPT_BYTES].decode("utf-8", "replace")[:EXCERPT_CHARS]


@dataclass
class Outcome:
    """What one attempt came to."""

    attempt: int
    status: int | None = None  # the HTTP status, when an answer came
    error: str | None = None  # None: delivered
    excerpt: str | None = None  # the start of the answer's body
    duration_ms: float = 0.0
    response: httpx.Response | None = None


def deliver(delivery_id: str, client: httpx.Client | None = None) -> str:
    """Make one attempt at DELIVERY_ID and record it; returns the delivery's state afterwards."""
    with session_scope() as session:
        row = session.execute(text(
            "SELECT d.id, d.attempts, d.state, w.id AS webhook_id, w.url, w.enabled, w.secret_encrypted, "
            "w.failing_since, e.id AS event_id, e.type, e.payload, e.created_at "
            "FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id "
            "JOIN webhook_events e ON e.id = d.event_id WHERE d.id = :id FOR UPDATE OF d SKIP LOCKED"
        ), {"id": delivery_id}).one_or_none()
        if row is None or row.state != "pending":
            return row.state if row else "missing"
        began = time.perf_counter()
        outcome = _attempt(row, client) if row.enabled else Outcome(row.attempts + 1, error="endpoint disabled")
        outcome.duration_ms = round((time.perf_counter() - began) * 1000, 1)
        return _record(session, row, outcome)


def _attempt(row, client: httpx.Client | None) -> Outcome:
    settings = get_settings()
    outcome = Outcome(row.attempts + 1)
    try:
        address = netguard.resolve(row.url, settings.webhook_allow_private)
        body = body_of(row)
        now = datetime.now(UTC)
        signature = _signer(row.secret_encrypted).sign(row.event_id, now, body)
        headers = {"webhook-id": row.event_id, "webhook-timestamp": str(int(now.timestamp())),
                   "webhook-signature": signature, "Content-Type": "application/json",
                   "User-Agent": "Ingot-Webhooks/1"}
        own = client or httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False)
        deadline = time.monotonic() + settings.webhook_timeout_seconds  # for the whole answer
        try:
            response, outcome.excerpt = _post(own, row.url, address, body, headers, deadline)
        finally:
            if client is None:
                own.close()
        outcome.response, outcome.status = response, response.status_code
        if not response.is_success:
            outcome.error = f"HTTP {response.status_code}"
    except netguard.UnsafeUrl as exc:
        outcome.error = f"refused: {exc}"
    except httpx.TimeoutException:
        outcome.error = f"no answer within {settings.webhook_timeout_seconds:g} s"
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"[:500]
    return outcome


def _record(session: Session, row, outcome: Outcome) -> str:
    """Record OUTCOME and decide what follows: delivered, retried later, failed, or the endpoint disabled."""
    settings = get_settings()
    schedule = runtime.retry_schedule()
    now = datetime.now(UTC)
    attempt, status, error = outcome.attempt, outcome.status, outcome.error
    next_at = None
    if error is None:
        state = "succeeded"
        if row.failing_since is not None:
            session.execute(text("UPDATE webhooks SET failing_since = NULL WHERE id = :w"), {"w": row.webhook_id})
    elif status == 410 or not row.enabled:
        state = "failed"
        if status == 410:
            _disable(session, row.webhook_id, "the endpoint answered 410 Gone")
    elif attempt < len(schedule):
        state = "pending"
        delay = retry_after(outcome.response, RETRY_AFTER_CAP)
        if delay is None:
            delay = schedule[attempt] * random.uniform(0.8, 1.2)  # jitter: retries from many events spread out
        next_at = now + timedelta(seconds=delay)
    else:
        state = "failed"
    if error is not None and row.enabled and status != 410:
        since = row.failing_since or now
        session.execute(text("UPDATE webhooks SET failing_since = COALESCE(failing_since, now()) WHERE id = :w"),
                        {"w": row.webhook_id})
        if (now - since).total_seconds() > settings.webhook_disable_after_seconds:
            _disable(session, row.webhook_id, f"every delivery failed since {utc_z(since)}")
    session.execute(text(
        "INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, status_code, duration_ms, error, "
        "response_excerpt, next_retry_at) VALUES (:d, :a, now(), :s, :ms, :e, :x, :n)"
    ), {"d": row.id, "a": attempt, "s": status, "ms": outcome.duration_ms, "e": error, "x": outcome.excerpt,
        "n": next_at})
    session.execute(text(
        "UPDATE webhook_deliveries SET attempts = :a, state = :state, next_attempt_at = :n, claimed_until = NULL, "
        "last_status_code = :s, last_error = :e, completed_at = CASE WHEN :state = 'pending' THEN NULL ELSE now() END "
        "WHERE id = :d"
    ), {"a": attempt, "state": state, "n": next_at, "s": status, "e": error, "d": row.id})
    if error:
        log.info("webhook delivery %s attempt %s failed: %s", row.id, attempt, error)
    return state


def _disable(session: Session, webhook_id: str, reason: str) -> None:
    session.execute(text(
        "UPDATE webhooks SET enabled = false, disabled_at = now(), disabled_reason = :r WHERE id = :w AND enabled"
    ), {"w": webhook_id, "r": reason})
    log.warning("webhook %s disabled: %s", webhook_id, reason)
