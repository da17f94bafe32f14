"""Webhook endpoints and their delivery log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select, text

from api.deps import ReadKey, SessionDep, WriteKey
from api.envelope import ApiError, Envelope, UTCDateTime, ok
from api.routes import newest_first_page
from pipelines import netguard, webhooks
from pipelines.db import on_commit
from pipelines.models import Webhook, WebhookDelivery
from worker.dispatch import relay_webhooks

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2000)
    events: list[str] = Field(min_length=1, max_length=len(webhooks.EVENTS))
    secret: str | None = Field(default=None, max_length=200)

    @field_validator("events")
    @classmethod
    def _known(cls, events: list[str]) -> list[str]:
        unknown = sorted(set(events) - set(webhooks.EVENTS))
        if unknown:
            raise ValueError(f"unknown event(s) {unknown}; known: {list(webhooks.EVENTS)}")
        return events


class WebhookOut(BaseModel):
    id: str
    url: str
    events: list[str]
    enabled: bool
    created_at: UTCDateTime
    disabled_at: UTCDateTime | None = None
    disabled_reason: str | None = None
    failing_since: UTCDateTime | None = None


class WebhookCreated(WebhookOut):
    secret: str


class WebhookList(BaseModel):
    webhooks: list[WebhookOut]


class Attempt(BaseModel):
    attempt: int
    attempted_at: UTCDateTime
    status_code: int | None
    duration_ms: float | None
    error: str | None
    response_excerpt: str | None
    next_retry_at: UTCDateTime | None


class Delivery(BaseModel):
    id: str
    event_id: str
    event_type: str
    state: str
    attempts: int
    status_code: int | None
    error: str | None
    next_retry_at: UTCDateTime | None
    created_at: UTCDateTime
    completed_at: UTCDateTime | None
    attempt_log: list[Attempt]


class DeliveryList(BaseModel):
    deliveries: list[Delivery]


def _view(hook: Webhook) -> dict:
    return {k: getattr(hook, k) for k in WebhookOut.model_fields}


def _hook(session, webhook_id: str) -> Webhook:
    hook = session.get(Webhook, webhook_id)
    if hook is None or hook.deleted_at is not None:
        raise ApiError(404, f"no webhook '{webhook_id}'")
    return hook


@router.post("", status_code=201, response_model=Envelope[WebhookCreated])
def create(body: WebhookIn, request: Request, session: SessionDep, key: WriteKey) -> dict:
    """Register an endpoint. The secret (generated when none is given) is shown only in this answer."""
    try:
        hook, secret = webhooks.create(session, body.url, body.events, body.secret, key.id)
    except (netguard.UnsafeUrl, ValueError) as exc:
        raise ApiError(422, str(exc)) from None
    session.commit()
    return ok(request, {**_view(hook), "secret": secret}, message="store the secret now: it is not shown again")


@router.get("", response_model=Envelope[WebhookList])
def list_webhooks(request: Request, session: SessionDep, _key: ReadKey) -> dict:
    hooks = session.scalars(select(Webhook).where(Webhook.deleted_at.is_(None)).order_by(Webhook.created_at))
    return ok(request, {"webhooks": [_view(h) for h in hooks]}, next_cursor=None)


@router.get("/{webhook_id}", response_model=Envelope[WebhookOut])
def get_webhook(webhook_id: str, request: Request, session: SessionDep, _key: ReadKey) -> dict:
    return ok(request, _view(_hook(session, webhook_id)))


@router.delete("/{webhook_id}", response_model=Envelope[WebhookOut])
def delete_webhook(webhook_id: str, request: Request, session: SessionDep, _key: WriteKey) -> dict:
    hook = _hook(session, webhook_id)
    session.execute(text("UPDATE webhooks SET deleted_at = now(), enabled = false WHERE id = :id"), {"id": hook.id})
    session.execute(text("UPDATE webhook_deliveries SET state = 'failed', last_error = 'endpoint deleted', "
                         "completed_at = now() WHERE webhook_id = :id AND state = 'pending'"), {"id": hook.id})
    session.commit()
    session.refresh(hook)
    return ok(request, _view(hook), message="webhook deleted")


@router.get("/{webhook_id}/deliveries", response_model=Envelope[DeliveryList])
def deliveries(
    webhook_id: str,
    request: Request,
    session: SessionDep,
    _key: ReadKey,
    state: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> dict:
    """Every delivery to this endpoint, newest first, each with every attempt."""
    _hook(session, webhook_id)
    query = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
    if state:
        query = query.where(WebhookDelivery.state == state)
    rows, next_cursor = newest_first_page(session, query, WebhookDelivery.created_at, WebhookDelivery.id, cursor, limit)
    ids = [r.id for r in rows]
    types = dict(session.execute(text("SELECT id, type FROM webhook_events WHERE id = ANY(:ids)"),
                                 {"ids": [r.event_id for r in rows]}).all())
    log: dict[str, list] = {i: [] for i in ids}
    for a in session.execute(text("SELECT * FROM webhook_attempts WHERE delivery_id = ANY(:ids) ORDER BY id"),
                             {"ids": ids}).mappings():
        log[a["delivery_id"]].append(dict(a))
    data = [{
        "id": r.id, "event_id": r.event_id, "event_type": types.get(r.event_id, ""), "state": r.state,
        "attempts": r.attempts, "status_code": r.last_status_code, "error": r.last_error,
        "next_retry_at": r.next_attempt_at if r.state == "pending" else None, "created_at": r.created_at,
        "completed_at": r.completed_at, "attempt_log": log[r.id],
    } for r in rows]
    return ok(request, {"deliveries": data}, next_cursor=next_cursor)


@router.post("/{webhook_id}/deliveries/{delivery_id}/redeliver", status_code=202,
             response_model=Envelope[dict])
def redeliver(webhook_id: str, delivery_id: str, request: Request, session: SessionDep, _key: WriteKey) -> dict:
    """Send a delivery again (same `webhook-id`), from the start of the retry schedule."""
    hook = _hook(session, webhook_id)
    if not hook.enabled:
        raise ApiError(409, f"webhook {hook.id} is disabled: {hook.disabled_reason}")
    if not webhooks.redeliver(session, webhook_id, delivery_id):
        raise ApiError(404, f"no delivery '{delivery_id}' for webhook {webhook_id}")
    on_commit(session, relay_webhooks)
    session.commit()
    return ok(request, {"delivery_id": delivery_id, "status": "pending"}, message="redelivery queued")
