"""Webhook endpoints: registering one (its secret generated or checked, kept encrypted), listing,
deleting, and their deliveries with every attempt."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Callable
from functools import lru_cache

from cryptography.fernet import Fernet
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from pipelines.core import netguard
from pipelines.core.db import affected, on_commit
from pipelines.core.errors import Conflict, Invalid, NotFound
from pipelines.core.models import DeliveryAttempt, Webhook, WebhookDelivery, WebhookEvent
from pipelines.core.pagination import Keyset
from pipelines.core.settings import get_settings

EVENTS = ("ingestion.completed", "ingestion.failed", "export.completed", "export.failed",
          "scenario.run.completed", "scenario.run.failed", "job.cancelled")
NEWEST_FIRST = Keyset((WebhookDelivery.created_at, WebhookDelivery.id), descending=True)


class TooManyWebhooks(Conflict):
    pass


# --- who receives what ----------------------------------------------------------------------------
# Decided in SQL, by two functions (migration 0015) that the relay (which deliveries to make) and each
# attempt (whether to send) both call: `ingot_owner_gone(owner)` (a key revoked or expired, a user
# disabled) and `ingot_sees_job(endpoint owner, job kind, job owner)` (an export's events only to its
# owner and admins).


def close_orphaned(session: Session) -> int:
    """Disable every enabled endpoint whose owner is gone, saying why (`key_revoked`, `key_expired`,
    `user_disabled`). Deliveries stop before this runs (the relay and each attempt check `ingot_owner_gone`):
    this makes the endpoint's state say so. Returns how many were disabled."""
    return affected(session.execute(text(
        "UPDATE webhooks w SET enabled = false, disabled_at = now(), disabled_reason = CASE "
        "  WHEN EXISTS (SELECT 1 FROM api_keys k WHERE k.id = w.api_key_id AND k.revoked_at IS NOT NULL) "
        "    THEN 'key_revoked' "
        "  WHEN EXISTS (SELECT 1 FROM api_keys k WHERE k.id = w.api_key_id) THEN 'key_expired' "
        "  ELSE 'user_disabled' END "
        "WHERE w.enabled AND w.deleted_at IS NULL AND ingot_owner_gone(w.api_key_id)"
    )))


# --- secrets, encrypted at rest -------------------------------------------------------------------


def generate_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_secret(secret: str) -> str:
    """A caller's own secret must be `whsec_` + base64 of at least 24 bytes."""
    body = secret.removeprefix("whsec_")
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except ValueError:
        raise Invalid("secret must be 'whsec_' followed by base64") from None
    if len(raw) < 24:
        raise Invalid("secret must hold at least 24 random bytes")
    return secret if secret.startswith("whsec_") else "whsec_" + body


@lru_cache(maxsize=4)
def _fernet_for(key: str) -> Fernet:
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()))


def _fernet() -> Fernet:
    return _fernet_for(get_settings().encryption_key())


def encrypt(secret: str) -> str:
    return _fernet().encrypt(secret.encode()).decode()


def decrypt(token: str) -> str:
    return _fernet().decrypt(token.encode()).decode()


# --- endpoints ------------------------------------------------------------------------------------


def create(session: Session, url: str, events: list[str], secret: str | None, api_key_id: str | None
           ) -> tuple[Webhook, str]:
    """Register URL for EVENTS; returns the endpoint and its secret (shown to the caller once).
    TooManyWebhooks past `INGOT_MAX_WEBHOOKS_PER_KEY` for the caller."""
    most = get_settings().max_webhooks_per_key
    if api_key_id is not None and len(listing(session, api_key_id)) >= most:
        raise TooManyWebhooks(f"this key already has {most} webhooks; delete one first")
    netguard.resolve(url, get_settings().webhook_allow_private)
    secret = check_secret(secret) if secret else generate_secret()
    hook = Webhook(url=url, events=sorted(set(events)), secret_encrypted=encrypt(secret), enabled=True,
                   api_key_id=api_key_id)
    session.add(hook)
    session.flush()
    return hook, secret


def listing(session: Session, owner: str | None) -> list[Webhook]:
    """Every endpoint not deleted (of OWNER only, unless None), oldest first."""
    query = select(Webhook).where(Webhook.deleted_at.is_(None)).order_by(Webhook.created_at)
    if owner is not None:
        query = query.where(Webhook.api_key_id == owner)
    return list(session.scalars(query))


def get(session: Session, webhook_id: str, owner: str | None) -> Webhook | None:
    """The endpoint, unless deleted or (OWNER given) someone else's: another caller cannot tell it exists."""
    hook = session.get(Webhook, webhook_id)
    if hook is None or hook.deleted_at is not None or (owner is not None and hook.api_key_id != owner):
        return None
    return hook


def delete(session: Session, hook: Webhook) -> None:
    """Delete HOOK: it receives nothing more, and its pending deliveries fail."""
    session.execute(text("UPDATE webhooks SET deleted_at = now(), enabled = false WHERE id = :id"), {"id": hook.id})
    session.execute(text("UPDATE webhook_deliveries SET state = 'failed', last_error = 'endpoint deleted', "
                         "completed_at = now() WHERE webhook_id = :id AND state = 'pending'"), {"id": hook.id})
    session.flush()
    session.refresh(hook)


def deliveries(session: Session, webhook_id: str, *, state: str | None, cursor: str | None, limit: int
               ) -> tuple[list[dict], str | None]:
    """The endpoint's deliveries newest first, each with its event type and every attempt."""
    query = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
    if state:
        query = query.where(WebhookDelivery.state == state)
    rows, next_cursor = NEWEST_FIRST.page(session, query, cursor, limit)
    types = dict(session.execute(select(WebhookEvent.id, WebhookEvent.type)
                                 .where(WebhookEvent.id.in_([r.event_id for r in rows]))).tuples().all())
    log: dict[str, list[dict]] = {r.id: [] for r in rows}
    for a in session.scalars(select(DeliveryAttempt).where(DeliveryAttempt.delivery_id.in_(list(log)))
                             .order_by(DeliveryAttempt.id)):
        log[a.delivery_id].append({
            "attempt": a.attempt, "attempted_at": a.attempted_at, "status_code": a.status_code,
            "duration_ms": a.duration_ms, "error": a.error, "response_excerpt": a.response_excerpt,
            "next_retry_at": a.next_retry_at})
    return [{
        "id": r.id, "event_id": r.event_id, "event_type": types.get(r.event_id, ""), "state": r.state,
        "attempts": r.attempts, "status_code": r.last_status_code, "error": r.last_error,
        "next_retry_at": r.next_attempt_at if r.state == "pending" else None, "created_at": r.created_at,
        "completed_at": r.completed_at, "attempt_log": log[r.id],
    } for r in rows], next_cursor


def redeliver(session: Session, hook: Webhook, delivery_id: str, relay: Callable[[], object]) -> None:
    """Send DELIVERY_ID of HOOK again from its first retry step (history kept), relayed once this
    commits. Conflict while the endpoint is disabled (nothing would be sent); NotFound if it has no
    such delivery."""
    if not hook.enabled:
        raise Conflict(f"webhook {hook.id} is disabled: {hook.disabled_reason}")
    if not affected(session.execute(text(
        "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = now(), "
        "claimed_until = NULL, completed_at = NULL WHERE id = :d AND webhook_id = :w"
    ), {"d": delivery_id, "w": hook.id})):
        raise NotFound(f"no delivery '{delivery_id}' for webhook {hook.id}")
    on_commit(session, relay)
