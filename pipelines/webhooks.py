"""Webhooks: endpoints, the outbox relay, and signed deliveries with retries.

A job's end writes an event row in the same transaction (a trigger: see migration 0003). The relay
turns each new event into one delivery per subscribed endpoint; a delivery is attempted at once and
then on the retry schedule, every attempt recorded. Bodies are signed per Standard Webhooks, with a
`webhook-id` that stays the same across retries and redeliveries so receivers can de-duplicate, and
each carries the event's timestamp so receivers can order deliveries that arrive concurrently.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import secrets
import time
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import httpx
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.orm import Session
from standardwebhooks import Webhook as Signer

from pipelines import netguard, runtime
from pipelines.db import session_scope
from pipelines.models import Webhook
from pipelines.settings import get_settings

log = logging.getLogger(__name__)

EVENTS = ("ingestion.completed", "ingestion.failed", "export.completed", "export.failed",
          "scenario.run.completed", "scenario.run.failed", "job.cancelled")
EXCERPT_CHARS = 1000


# --- secrets --------------------------------------------------------------------------------------


def generate_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_secret(secret: str) -> str:
    """A caller's own secret must be `whsec_` + base64 of at least 24 bytes."""
    body = secret.removeprefix("whsec_")
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except ValueError:
        raise ValueError("secret must be 'whsec_' followed by base64") from None
    if len(raw) < 24:
        raise ValueError("secret must hold at least 24 random bytes")
    return secret if secret.startswith("whsec_") else "whsec_" + body


@lru_cache(maxsize=4)
def _fernet_for(key: str) -> Fernet:
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()))


def _fernet() -> Fernet:
    return _fernet_for(get_settings().encryption_key())


@lru_cache(maxsize=1024)
def _signer(secret_encrypted: str) -> Signer:
    return Signer(decrypt(secret_encrypted))


def encrypt(secret: str) -> str:
    return _fernet().encrypt(secret.encode()).decode()


def decrypt(token: str) -> str:
    return _fernet().decrypt(token.encode()).decode()


# --- endpoints ------------------------------------------------------------------------------------


def create(session: Session, url: str, events: list[str], secret: str | None, api_key_id: str | None
           ) -> tuple[Webhook, str]:
    """Register URL for EVENTS; returns the endpoint and its secret (shown to the caller once)."""
    netguard.resolve(url, get_settings().webhook_allow_private)
    secret = check_secret(secret) if secret else generate_secret()
    hook = Webhook(url=url, events=sorted(set(events)), secret_encrypted=encrypt(secret), enabled=True,
                   api_key_id=api_key_id)
    session.add(hook)
    session.flush()
    return hook, secret


# --- the relay: events become deliveries ----------------------------------------------------------


def relay(session: Session) -> list[str]:
    """Fan new events out to their endpoints and claim every delivery that is due; returns the
    deliveries to send (after this transaction commits)."""
    session.execute(text(
        "WITH fresh AS (SELECT id, type FROM webhook_events WHERE dispatched_at IS NULL "
        "               ORDER BY created_at LIMIT 1000 FOR UPDATE SKIP LOCKED), "
        "     marked AS (UPDATE webhook_events e SET dispatched_at = now() FROM fresh WHERE e.id = fresh.id) "
        "INSERT INTO webhook_deliveries (id, webhook_id, event_id, state, attempts, next_attempt_at, created_at) "
        "SELECT 'dlv_' || md5(w.id || fresh.id), w.id, fresh.id, 'pending', 0, now(), now() "
        "FROM fresh JOIN webhooks w ON w.enabled AND w.deleted_at IS NULL AND fresh.type = ANY(w.events) "
        "ON CONFLICT DO NOTHING"
    ))
    return list(session.execute(text(
        "UPDATE webhook_deliveries SET next_attempt_at = NULL, claimed_until = now() + make_interval(secs => :c) "
        "WHERE id IN (SELECT id FROM webhook_deliveries WHERE state = 'pending' AND "
        "             (next_attempt_at <= now() OR (next_attempt_at IS NULL AND claimed_until < now())) "
        "             ORDER BY next_attempt_at NULLS FIRST LIMIT 5000 FOR UPDATE SKIP LOCKED) "
        "RETURNING id"
    ), {"c": get_settings().webhook_claim_seconds}).scalars())


def redeliver(session: Session, webhook_id: str, delivery_id: str) -> bool:
    """Send DELIVERY_ID again from its first retry step (history kept); False if there is no such one."""
    return bool(session.execute(text(
        "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = now(), "
        "claimed_until = NULL, completed_at = NULL WHERE id = :d AND webhook_id = :w"
    ), {"d": delivery_id, "w": webhook_id}).rowcount)


# --- one attempt ----------------------------------------------------------------------------------


def body_of(event) -> str:
    return json.dumps({"type": event.type, "timestamp": _iso(event.created_at), "data": event.payload},
                      separators=(",", ":"))


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _retry_after(response: httpx.Response | None) -> float | None:
    if response is None or response.status_code not in (429, 503):
        return None
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return min(float(value), 24 * 3600)
    return None


def _post(client: httpx.Client, url: str, address: str, body: str, headers: dict) -> httpx.Response:
    """POST to the checked ADDRESS, presenting URL's host (Host header and TLS name) to the server."""
    target = httpx.URL(url)
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    host_header = target.host if target.port is None else f"{target.host}:{target.port}"
    return client.post(target.copy_with(host=address), content=body.encode(),
                       headers={**headers, "Host": host_header}, extensions=extensions)


def deliver(delivery_id: str, client: httpx.Client | None = None) -> str:
    """Make one attempt at DELIVERY_ID and record it; returns the delivery's state afterwards."""
    settings = get_settings()
    with session_scope() as session:
        row = session.execute(text(
            "SELECT d.id, d.attempts, d.state, w.id AS webhook_id, w.url, w.enabled, w.secret_encrypted, "
            "w.failing_since, e.id AS event_id, e.type, e.payload, e.created_at "
            "FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id "
            "JOIN webhook_events e ON e.id = d.event_id WHERE d.id = :id FOR UPDATE OF d SKIP LOCKED"
        ), {"id": delivery_id}).one_or_none()
        if row is None or row.state != "pending":
            return row.state if row else "missing"
        attempt = row.attempts + 1
        status, error, excerpt, response = None, None, None, None
        began = time.perf_counter()
        if not row.enabled:
            error = "endpoint disabled"
        else:
            try:
                address = netguard.resolve(row.url, settings.webhook_allow_private)
                body = body_of(row)
                now = datetime.now(UTC)
                signature = _signer(row.secret_encrypted).sign(row.event_id, now, body)
                headers = {"webhook-id": row.event_id, "webhook-timestamp": str(int(now.timestamp())),
                           "webhook-signature": signature, "Content-Type": "application/json",
                           "User-Agent": "Ingot-Webhooks/1"}
                own = client or httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False)
                try:
                    response = _post(own, row.url, address, body, headers)
                finally:
                    if client is None:
                        own.close()
                status = response.status_code
                excerpt = response.text[:EXCERPT_CHARS]
                if not response.is_success:
                    error = f"HTTP {status}"
            except netguard.UnsafeUrl as exc:
                error = f"refused: {exc}"
            except httpx.TimeoutException:
                error = f"no answer within {settings.webhook_timeout_seconds:g} s"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
        duration = (time.perf_counter() - began) * 1000
        return _record(session, row, attempt, status, error, excerpt, duration, response)


def _record(session, row, attempt, status, error, excerpt, duration, response) -> str:
    settings = get_settings()
    schedule = runtime.retry_schedule()
    now = datetime.now(UTC)
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
        delay = _retry_after(response)
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
            _disable(session, row.webhook_id, f"every delivery failed since {_iso(since)}")
    session.execute(text(
        "INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, status_code, duration_ms, error, "
        "response_excerpt, next_retry_at) VALUES (:d, :a, now(), :s, :ms, :e, :x, :n)"
    ), {"d": row.id, "a": attempt, "s": status, "ms": round(duration, 1), "e": error, "x": excerpt, "n": next_at})
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
